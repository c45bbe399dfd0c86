"""Nothing reaches for the network at import or start-up (no price lists, no tokenizers)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import ROOT

# Every outbound connect is recorded and refused; loopback is allowed (our own stack).
PROBE = """
import socket, sys
attempts = []
real_connect = socket.socket.connect
def connect(self, address):
    host = address[0] if isinstance(address, tuple) else str(address)
    if host not in ("127.0.0.1", "::1", "localhost"):
        attempts.append(address)
        raise OSError("network disabled by test")
    return real_connect(self, address)
socket.socket.connect = connect
real_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if host not in ("127.0.0.1", "::1", "localhost", None):
        attempts.append(host)
        raise socket.gaierror("network disabled by test")
    return real_getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
import tools.cli, actors.supervisor, actors.adapters.llm.openai_wire, actors.adapters.llm.tokens
from actors.adapters.llm.tokens import TokenCounter
from actors.adapters.llm.chat import cost_usd
from messages.ports import Rates, TokenCounts
TokenCounter("gpt-4o-mini").count("hello world")
TokenCounter("openai/smollm2").count("hello world")
cost_usd("gpt-4o-mini", TokenCounts(prompt=10, completion=10), Rates())
print("ATTEMPTS", attempts)
"""


def test_importing_the_worker_and_counting_tokens_touch_no_network():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM", "TIKTOKEN"))}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ATTEMPTS []" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "cost map fetch" not in done.stderr
