"""Adapters of Redis: connecting, the worker's event writes, and the gateway's stream
reads on one server or a cluster."""
