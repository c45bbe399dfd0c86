"""Benchmarks: run with `bin/chat-actors bench NAME`. They report numbers; tests never assert timings."""
