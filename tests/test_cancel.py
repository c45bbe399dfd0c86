"""Cancel from chat.control (contract 2.2, 4.3): owner, foreign, early and late cancels."""

from __future__ import annotations

import json

import trio

from actors.registry import JobRegistry
from tests.helpers import (
    events_of,
    job_row,
    message_rows,
    produce,
    request,
    until,
    worker_running,
)
from tests.scripted_llm import Reply

SLOW = Reply(tokens=tuple(f"t{i} " for i in range(40)), token_delay_s=0.1)


def cancel(config, job_id: str, user_id: str, reason: str = "stop") -> None:
    produce(config, json.dumps({"type": "cancel", "jobId": job_id, "userId": user_id,
                                "reason": reason}).encode(), topic=config.kafka.control_topic)


async def wait_tokens(llm, count: int) -> None:
    await trio.to_thread.run_sync(lambda: llm.wait_until(
        lambda calls: calls and calls[-1].tokens_sent >= count, 30))


async def test_owner_cancel_stops_the_stream_and_keeps_the_partial_answer(config, llm, rds, db):
    llm.default = SLOW
    req = request("tell me a long story")
    async with worker_running(config):
        produce(config, req)
        await wait_tokens(llm, 3)
        cancel(config, req["jobId"], "alice", reason="user pressed stop")
        events = await events_of(rds, config, req["jobId"])
        await trio.to_thread.run_sync(lambda: llm.wait_until(
            lambda calls: calls[0].disconnected or calls[0].finished, 10))

    assert llm.calls[0].disconnected and llm.calls[0].tokens_sent < 40
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done" and "final" not in kinds
    assert "error" not in kinds  # the user's own stop is not an error
    assert events[-1]["data"] == {"status": "cancelled", "partial": True}
    streamed = "".join(e["data"]["text"] for e in events if e["event"] == "token")
    assert streamed.startswith("t0 t1 t2 ")
    row = job_row(db, req["jobId"])
    assert row["status"] == "cancelled" and row["partial"] is True
    assistant = [m for m in message_rows(db, req["jobId"]) if m["role"] == "assistant"]
    assert assistant[0]["content"] == streamed and assistant[0]["partial"] is True


async def test_a_cancel_from_another_user_changes_nothing(config, llm, rds, db):
    llm.default = Reply(tokens=tuple(f"t{i} " for i in range(10)), token_delay_s=0.1)
    req = request("mine")
    async with worker_running(config) as worker:
        produce(config, req)
        await wait_tokens(llm, 2)
        cancel(config, req["jobId"], "mallory")
        await until(lambda: worker.control.applied == 1)
        events = await events_of(rds, config, req["jobId"])
    assert events[-1]["data"] == {"status": "completed", "partial": False}
    assert events[-2]["data"]["text"] == "".join(f"t{i} " for i in range(10))
    assert not llm.calls[0].disconnected
    assert job_row(db, req["jobId"])["status"] == "completed"
    assert all(e["userId"] == "alice" for e in events)  # nothing about mallory leaks in


async def test_a_cancel_that_arrives_before_its_job_ends_it_without_a_model_call(
        config, llm, rds, db):
    req = request("never run me")
    async with worker_running(config) as worker:
        cancel(config, req["jobId"], "alice", reason="changed my mind")
        await until(lambda: worker.registry.tombstones() == 1)
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    assert llm.calls == []
    assert [e["event"] for e in events] == ["started", "done"]
    assert events[-1]["data"] == {"status": "cancelled", "partial": False}
    assert job_row(db, req["jobId"])["status"] == "cancelled"


async def test_an_early_cancel_from_another_user_does_not_stop_the_job(config, llm, rds):
    req = request("run me")
    async with worker_running(config) as worker:
        cancel(config, req["jobId"], "mallory")
        await until(lambda: worker.registry.tombstones() == 1)
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    assert events[-1]["data"]["status"] == "completed" and len(llm.calls) == 1


async def test_cancelling_a_finished_job_has_no_effect(config, llm, rds, db):
    req = request("quick one")
    async with worker_running(config) as worker:
        produce(config, req)
        before = await events_of(rds, config, req["jobId"])
        cancel(config, req["jobId"], "alice")
        await until(lambda: worker.control.applied == 1)
    key = config.job_keys(req["jobId"]).stream
    assert rds.xlen(key) == len(before)  # no event after `done`
    assert job_row(db, req["jobId"])["status"] == "completed"
    assert len(llm.calls) == 1


async def test_bad_control_messages_are_counted_and_the_worker_goes_on(config, llm, rds):
    req = request("still fine")
    async with worker_running(config) as worker:
        produce(config, b"not json", b'{"type": "cancel", "jobId": "x y", "userId": "u"}',
                b'{"type": "pause", "jobId": "x"}', topic=config.kafka.control_topic)
        await until(lambda: worker.control.bad == 3)
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    assert events[-1]["data"]["status"] == "completed"


async def test_the_cancel_command_cancels_a_running_job(make_config, llm, rds):
    import subprocess
    import sys

    from tests.helpers import ROOT

    config, path = make_config()
    llm.default = SLOW
    req = request("long answer please")
    async with worker_running(config):
        produce(config, req)
        await wait_tokens(llm, 2)
        result = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "tools.cli", "cancel", req["jobId"], "--user", "alice",
             "--config", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60))
        events = await events_of(rds, config, req["jobId"])
    assert result.returncode == 0 and f"cancel sent for {req['jobId']}" in result.stdout
    assert events[-1]["data"] == {"status": "cancelled", "partial": True}


async def test_a_cancel_naming_another_users_job_never_replaces_the_owners():
    registry = JobRegistry(tombstone_ttl_s=60)
    registry.cancel("job-1", "alice", "changed my mind")
    registry.cancel("job-1", "mallory", "gotcha")
    assert registry.admit("job-1", "alice").cancel_reason == "changed my mind"
    assert not registry.admit("job-2", "mallory").cancel_scope.cancel_called


async def test_tombstones_are_bounded_per_user_and_in_total():
    evicted: list[None] = []
    registry = JobRegistry(tombstone_ttl_s=60, max_total=50, max_per_user=10,
                           on_evict=lambda: evicted.append(None))
    registry.cancel("mine", "alice", "stop")
    for n in range(1000):  # one user's flood evicts only that user's oldest
        registry.cancel(f"flood-{n}", "mallory", "x" * 10_000)
    assert registry.tombstones() == 11 and len(evicted) == 990
    assert registry.admit("mine", "alice").cancel_scope.cancel_called
    assert registry.admit("flood-999", "mallory").cancel_reason == "x" * 200  # kept short
    for n in range(60):  # many users: the total bound evicts the oldest of anyone's
        registry.cancel(f"job-{n}", f"user-{n}", "stop")
    assert registry.tombstones() == 50 and len(evicted) == 990 + 19
    assert registry.admit("job-59", "user-59").cancel_scope.cancel_called
    assert not registry.admit("job-0", "user-0").cancel_scope.cancel_called


async def test_a_cancel_outlives_its_jobs_wait_behind_the_session(make_config, llm, rds, db):
    """tombstone_ttl_s 0.5, and the cancelled job waits ~3 s behind its session's first:
    the tombstone lives the TTL plus the longest session wait, so the job never runs."""
    config, _ = make_config(extra="[control]\ntombstone_ttl_s = 0.5\n")
    llm.default = Reply(tokens=tuple(f"t{i} " for i in range(30)), token_delay_s=0.1)
    first = request("first", sessionId="s-wait")
    second = request("second", sessionId="s-wait")
    async with worker_running(config) as worker:
        produce(config, first)
        await wait_tokens(llm, 1)
        produce(config, second)
        cancel(config, second["jobId"], "alice", reason="not any more")
        await until(lambda: worker.registry.tombstones() == 1)
        events = await events_of(rds, config, second["jobId"])
    assert events[-1]["data"] == {"status": "cancelled", "partial": False}
    assert len(llm.calls) == 1  # the first job's only
    assert job_row(db, first["jobId"])["status"] == "completed"
