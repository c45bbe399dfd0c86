"""`chat-actors run` as a subprocess, driven only through the contract (docs/contract.md and 3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import confluent_kafka
import pytest
import trio

from tests.helpers import ROOT, events_of, job_row, produce, request, worker_running
from tests.many_workers import wait_for
from tests.scripted_llm import Reply
from tools import local_stack


def read_dlq(config, count: int, timeout_s: float = 30.0) -> list:
    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": config.kafka.bootstrap_servers, "group.id": "dlq-reader",
        "auto.offset.reset": "earliest", "session.timeout.ms": 2000,
        "log.connection.close": False})
    consumer.subscribe([config.kafka.dlq_topic])
    found = []
    try:
        while len(found) < count:
            message = consumer.poll(timeout_s)
            if message is None:
                break
            if message.error() is None:
                found.append(message)
    finally:
        consumer.close()
    return found


async def test_worker_process_serves_the_contract_and_drains_on_sigterm(make_config, llm, rds,
                                                                         db, tmp_path):
    config, path = make_config()
    llm.default = Reply(tokens=("Hi", " from", " the", " worker"))
    good = request("hello")
    bad = b'{"jobId": "job-bad-1", "userId": "alice", "sessionId": "s", "message": 42}'
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [str(ROOT / "bin" / "chat-actors"), "run", "--config", str(path)], cwd=tmp_path,
            stdout=log, stderr=log, env={**os.environ, "SCRIPTED_LLM_KEY": "sk-test-secret"})
    try:
        produce(config, bad, good)
        events = await events_of(rds, config, good["jobId"])
        rejected = await events_of(rds, config, "job-bad-1")
        code = await trio.to_thread.run_sync(local_stack.terminate, worker, signal.SIGTERM, 60)
    finally:
        local_stack.terminate(worker, signal.SIGKILL, 10)  # (a test that failed midway)
    assert code == 0
    assert events[-2]["data"]["text"] == "Hi from the worker"
    assert events[-1]["data"] == {"status": "completed", "partial": False}
    assert llm.calls[0].headers.get("authorization") == "Bearer sk-test-secret"

    # Bad input: a clear error on the job's stream, a rejected row, the DLQ copy.
    assert [e["event"] for e in rejected] == ["error", "done"]
    assert rejected[0]["data"]["code"] == "bad_request"
    assert "$.message: Expected `str`, got `int`" in rejected[0]["data"]["message"]
    assert rejected[1]["data"] == {"status": "rejected", "partial": False}
    assert job_row(db, "job-bad-1")["status"] == "rejected"
    dead = await trio.to_thread.run_sync(read_dlq, config, 1)
    assert dead[0].value() == bad
    headers = dict(dead[0].headers())
    assert headers["error.class"] == b"BadInput"
    assert headers["source.topic"] == config.kafka.request_topic.encode()
    assert b"$.message" in headers["error.message"]

    log_text = log_path.read_text()
    assert "sk-test-secret" not in log_text
    assert "bad request" in log_text and "$.message" in log_text

    # Both offsets were committed: a new worker of the group runs nothing again.
    async with worker_running(config):
        produce(config, request("after restart"))
        await trio.to_thread.run_sync(lambda: llm.wait_until(lambda calls: len(calls) == 2, 60))
    assert [c.messages[-1]["content"] for c in llm.calls] == ["hello", "after restart"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    service = local_stack.start_llama(tmp_path_factory.mktemp("llama"))
    yield service
    service.stop()


async def test_real_smollm2_streams_an_answer(make_config, smollm2, rds):
    config, _ = make_config(extra=f"""
[llm.models.smol]
model = "openai/smollm2"
api_base = "{smollm2.url}"
context_window = 2048
max_tokens = 48
""")
    req = request("Name a colour.", model="smol")
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"], timeout_s=120)
    tokens = [e for e in events if e["event"] == "token"]
    assert tokens and all(json.dumps(e["data"]) for e in tokens)
    assert events[-1]["data"]["status"] == "completed"
    final = events[-2]["data"]
    assert final["text"] == "".join(e["data"]["text"] for e in tokens)
    # max_tokens reached the server: llama.cpp may count the end-of-text token too.
    assert 0 < final["usage"]["completionTokens"] <= 48 + 1


def test_help_of_every_command():
    for command in ("run", "dev", "send", "cancel", "migrate"):
        result = subprocess.run([sys.executable, "-m", "tools.cli", command, "--help"],
                                cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and "usage: chat-actors " + command in result.stdout


async def test_send_prints_the_streamed_answer_and_its_status(make_config, llm):
    config, path = make_config()
    llm.default = Reply(tokens=("Stream", "ed", " reply"), prompt_tokens=10)
    async with worker_running(config):
        result = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "tools.cli", "send", "hello there", "--user", "bob",
             "--session", "cli-s", "--config", str(path)],
            cwd=ROOT, capture_output=True, text=True, timeout=120))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Streamed reply"
    # A model we serve ourselves that LiteLLM does not price costs 0, not "unknown".
    assert lines[1].startswith("[scripted: 10+3 tokens, cost $0.000000")
    assert lines[2].startswith("[done: completed in ")
    assert llm.calls[0].messages[-1] == {"role": "user", "content": "hello there"}


async def test_a_worker_whose_models_need_no_litellm_is_ready_and_answers_before_it_loads(
        make_config, llm, rds, db, tmp_path):
    """Cold start: a worker whose aliases are unmapped OpenAI-wire models does not wait
    for LiteLLM (seconds to import): it answers first, and loads LiteLLM once idle (held
    here until then)."""
    config, path = make_config()
    # The test config's "priced" alias is a model LiteLLM knows: this worker has only
    # the served one.
    text = path.read_text()
    start = text.index("[llm.models.priced]")
    end = text.find("\n[", start + 1)
    path.write_text(text[:start] + (text[end + 1:] if end >= 0 else ""))
    llm.default = Reply(tokens=("before", " LiteLLM"))
    release, log_path = tmp_path / "release", tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "litellm_held.py"), str(release), "run",
             "--config", str(path)], cwd=ROOT, stdout=log, stderr=log)
    try:
        job = request("hello")
        produce(config, job)
        events = await events_of(rds, config, job["jobId"])
        # Idle now: the worker loads LiteLLM (for the error answers it classifies).
        await trio.to_thread.run_sync(lambda: wait_for(
            "the loader", lambda: "litellm import held" in log_path.read_text(), 60))
        held_log = log_path.read_text()
        release.touch()
        await trio.to_thread.run_sync(lambda: wait_for(
            "LiteLLM loaded", lambda: "LiteLLM loaded in" in log_path.read_text(), 120))
        code = await trio.to_thread.run_sync(local_stack.terminate, worker, signal.SIGTERM, 60)
    finally:
        local_stack.terminate(worker, signal.SIGKILL, 10)  # (a test that failed midway)
    assert held_log.index(" ready: ") < held_log.index("litellm import held")
    assert "LiteLLM loaded" not in held_log
    assert events[-2]["data"]["text"] == "before LiteLLM"
    assert events[-1]["data"] == {"status": "completed", "partial": False}
    row = job_row(db, job["jobId"])
    assert row is not None and row["provider"] == "openai" and row["status"] == "completed"
    assert code == 0
