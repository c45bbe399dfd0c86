"""The domain loads no I/O library: importing every actor but the supervisor (the
worker's composition root), or every gateway module but gateway.server (the gateway's),
leaves Kafka, Redis, Postgres, LiteLLM, Chroma and asyncio's bridge unloaded.
import-linter checks the same statically in `bin/chat-actors test`; this checks what
really gets imported, lazily or not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

LIBRARIES = ("confluent_kafka", "redis", "psycopg", "litellm", "chromadb", "openai", "httpx",
             "tiktoken", "onnxruntime", "trio_asyncio", "actors.adapters")


@pytest.mark.parametrize(("package", "root", "known"), [
    ("actors", "supervisor", ["job.conversation", "job.provider", "intake"]),
    ("gateway", "server", ["app", "auth", "relay"]),
])
def test_only_the_composition_root_imports_an_adapter_or_io_library(package, root, known):
    top = ROOT / package
    domain = sorted(".".join((package, *p.relative_to(top).with_suffix("").parts))
                    for p in top.rglob("*.py")
                    if p.relative_to(top).parts[0] != "adapters"
                    and p.stem not in ("__init__", root))
    assert {f"{package}.{name}" for name in known} <= set(domain)
    probe = (f"import sys\nimport {', '.join(domain)}\n"
             f"print(sorted(m for m in {LIBRARIES!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_no_tool_lives_among_the_actors():
    # (Chunking was a tool until the gateway's uploads needed it: actors/chunking.py.)
    tools = {"cli", "devstack", "ingest", "local_stack", "chat_client"}
    present = {p.stem for p in Path(ROOT / "actors").rglob("*.py")}
    assert not tools & present
