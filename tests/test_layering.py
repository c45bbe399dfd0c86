"""The domain loads no I/O library: importing every actor but the supervisor (the
composition root) leaves Kafka, Redis, Postgres, LiteLLM, Chroma and asyncio's
bridge unloaded. import-linter checks the same statically in `bin/chat-actors test`;
this checks what really gets imported, lazily or not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

LIBRARIES = ("confluent_kafka", "redis", "psycopg", "litellm", "chromadb", "openai", "httpx",
             "tiktoken", "onnxruntime", "trio_asyncio", "actors.adapters")


def test_the_domain_imports_no_adapter_and_no_io_library():
    actors = ROOT / "actors"
    domain = sorted(".".join(("actors", *p.relative_to(actors).with_suffix("").parts))
                    for p in actors.rglob("*.py")
                    if p.relative_to(actors).parts[0] not in ("adapters", "gateway")
                    and p.stem not in ("__init__", "supervisor"))
    assert {"actors.job.conversation", "actors.job.provider", "actors.intake"} <= set(domain)
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
