"""Peer workers the benchmark runs against chat-actors on the same stack, in the same run."""
