"""GEN requests through the real stack: Kafka in, scripted vendor, Redis events, Postgres rows."""

from __future__ import annotations

import pytest

from tests.helpers import events_of, job_row, message_rows, produce, request, worker_running
from tests.scripted_llm import Reply


async def test_event_sequence_of_a_job(config, llm, rds):
    llm.default = Reply(tokens=("The", " sky", " is", " blue", "."))
    req = request("Why is the sky blue?")
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])

    kinds = [e["event"] for e in events]
    assert not [e["data"] for e in events if e["event"] == "error"]
    assert kinds[0] == "started" and kinds[-2:] == ["final", "done"]
    assert set(kinds[1:-2]) == {"token"}
    assert [int(e["seq"]) for e in events] == list(range(len(events)))
    for e in events:
        assert (e["jobId"], e["userId"], e["sessionId"], e["attempt"]) == (
            req["jobId"], "alice", req["sessionId"], "1")
        assert int(e["ts"]) > 0
    assert events[0]["data"] == {"model": "scripted", "mode": "gen", "attempt": 1}
    tokens = "".join(e["data"]["text"] for e in events if e["event"] == "token")
    final = events[-2]["data"]
    assert tokens == final["text"] == "The sky is blue."
    assert final["finishReason"] == "stop" and final["model"] == "scripted"
    assert final["usage"]["completionTokens"] == 5
    assert events[-1]["data"] == {"status": "completed", "partial": False}
    assert kinds.count("done") == 1


async def test_job_and_message_rows_with_cost(config, llm, rds, db):
    llm.default = Reply(tokens=("Four", "."), prompt_tokens=1000)
    req = request("What is 2+2?", model="priced")
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])

    row = job_row(db, req["jobId"])
    assert row["status"] == "completed" and row["attempt"] == 1
    assert (row["user_id"], row["session_id"], row["model"]) == ("alice", req["sessionId"], "priced")
    assert row["provider"] == "openai"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (1000, 2)
    # gpt-4o-mini in LiteLLM's bundled price map: $0.15 / 1M in, $0.60 / 1M out.
    assert float(row["cost_usd"]) == pytest.approx(1000 * 0.15e-6 + 2 * 0.6e-6)
    assert events[-2]["data"]["costUsd"] == pytest.approx(float(row["cost_usd"]))
    assert row["ttft_ms"] is not None and row["latency_ms"] >= row["ttft_ms"] >= 0
    # The lease ends with the job; its holder stays named (the worker that ended it).
    assert row["finished_at"] is not None and row["lease_until"] is None
    assert row["lease_owner"] is not None
    assert row["partial"] is False
    messages = message_rows(db, req["jobId"])
    assert [(m["role"], m["content"], m["partial"]) for m in messages] == [
        ("user", "What is 2+2?", False), ("assistant", "Four.", False)]


async def test_second_turn_sees_first_and_users_are_isolated(config, llm, rds):
    llm.default = Reply(tokens=("Paris",))
    first = request("Capital of France?", sessionId="shared-session")
    second = request("And its population?", sessionId="shared-session")
    mallory = request("What did I ask?", sessionId="shared-session", userId="mallory")
    async with worker_running(config):
        produce(config, first)
        await events_of(rds, config, first["jobId"])
        produce(config, second)
        await events_of(rds, config, second["jobId"])
        produce(config, mallory)
        await events_of(rds, config, mallory["jobId"])

    sent = [call.messages for call in llm.calls]
    assert sent[1] == [
        {"role": "system", "content": "You are a test."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And its population?"},
    ]
    # Same session id, another user: none of alice's turns.
    assert sent[2] == [{"role": "system", "content": "You are a test."},
                       {"role": "user", "content": "What did I ask?"}]


async def test_long_history_is_trimmed_to_the_context_budget(make_config, llm, rds):
    config, _ = make_config(extra="""
[llm.models.small]
model = "openai/scripted-model"
api_base = "%s"
api_key_env = "SCRIPTED_LLM_KEY"
context_window = 300
max_tokens = 100
""" % llm.url)
    llm.default = Reply(tokens=("ok",))
    session = "long-session"
    async with worker_running(config):
        for i in range(8):
            turn = request(f"question {i} " + "word " * 30, sessionId=session, model="small")
            produce(config, turn)
            events = await events_of(rds, config, turn["jobId"])
            assert events[-1]["data"]["status"] == "completed"

    last = llm.calls[-1].messages
    assert last[0]["role"] == "system" and last[-1]["content"].startswith("question 7")
    kept = [m["content"] for m in last if m["role"] == "user"][:-1]
    # Oldest turns went first: what is kept is the most recent run of questions.
    assert kept and kept == [f"question {i} " + "word " * 30 for i in range(8 - 1 - len(kept), 7)]
    assert len(kept) < 7
    assert last[1]["role"] == "user"  # never starts with a reply to a dropped question


async def test_trace_id_comes_from_the_request_or_its_traceparent_header(config, llm, rds, db):
    explicit = request("one", traceId="trace-from-body")
    from_header = request("two")
    generated = request("three")
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with worker_running(config):
        produce(config, explicit, generated)
        produce(config, from_header,
                headers=[("traceparent", f"00-{trace}-00f067aa0ba902b7-01".encode())])
        for job in (explicit, from_header, generated):
            await events_of(rds, config, job["jobId"])
    assert job_row(db, explicit["jobId"])["trace_id"] == "trace-from-body"
    assert job_row(db, from_header["jobId"])["trace_id"] == trace
    assert len(job_row(db, generated["jobId"])["trace_id"]) == 32  # generated when absent


async def test_a_taken_health_port_does_not_stop_the_worker(make_config, llm, rds):
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config, _ = make_config(environ={"CHAT_ACTORS__HEALTH__PORT": str(port)})
        req = request("still serving")
        async with worker_running(config) as worker:
            produce(config, req)
            events = await events_of(rds, config, req["jobId"])
    assert worker.health_port == 0
    assert events[-1]["data"]["status"] == "completed"


async def test_a_vendor_answer_holding_u0000_is_stored_without_it(config, llm, rds, db):
    # Postgres cannot store U+0000: the answer used to be refused at the job's end,
    # which stopped the process (and the redelivery paid the model again).
    llm.default = Reply(tokens=("nul", "\x00", " byte"))
    req, after = request("Say a NUL"), request("Still here?")
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
        produce(config, after)
        later = await events_of(rds, config, after["jobId"])
    assert events[-1]["data"]["status"] == "completed"
    final = events[-2]["data"]
    assert final["text"] == "nul byte"
    assert final["nulRemoved"] == 1  # the client is told that character was all it lost
    assert "".join(e["data"]["text"] for e in events if e["event"] == "token") == "nul byte"
    assert [m["content"] for m in message_rows(db, req["jobId"])] == ["Say a NUL", "nul byte"]
    assert later[-1]["data"]["status"] == "completed"


async def test_an_api_key_with_a_trailing_newline_is_sent_without_it(config, llm, rds,
                                                                       monkeypatch):
    # A Kubernetes secret made with `echo` ends in a newline; sent as is, it broke the
    # request (or put a raw newline into a header).
    monkeypatch.setenv("SCRIPTED_LLM_KEY", "sk-from-a-file\n")
    req = request("Hello with a key")
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    assert events[-1]["data"]["status"] == "completed"
    headers = {name.lower(): value for name, value in llm.calls[0].headers.items()}
    assert headers["authorization"] == "Bearer sk-from-a-file"


async def test_reasoning_streams_as_its_own_events_and_keeps_a_slow_thinker_alive(
        make_config, llm, rds, db):
    """A reasoning model thinks for 1.6 s before its first answer token, past a 1 s
    first_token_timeout: its reasoning shows it is alive. The reasoning streams as
    `reasoning` events, and never reaches `token`, `final` or the history."""
    config, _ = make_config(environ={"CHAT_ACTORS__JOBS__FIRST_TOKEN_TIMEOUT_S": "1"})
    llm.default = Reply(reasoning=tuple(f"step {i}. " for i in range(5)), tokens=("4", "2"),
                        token_delay_s=0.4)
    req = request("What is six times seven?")
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-2:] == ["final", "done"]
    assert kinds.index("token") > max(i for i, k in enumerate(kinds) if k == "reasoning")
    thought = "".join(e["data"]["text"] for e in events if e["event"] == "reasoning")
    assert thought == "step 0. step 1. step 2. step 3. step 4. "
    assert "".join(e["data"]["text"] for e in events if e["event"] == "token") == "42"
    assert events[-2]["data"]["text"] == "42" and events[-1]["data"]["status"] == "completed"
    assert [m["content"] for m in message_rows(db, req["jobId"])] == [
        "What is six times seven?", "42"]
