"""contract 6.1: an offset is committed only once its job is persisted."""

from __future__ import annotations

import time

import trio

from actors.offsets import OffsetTracker
from tests.helpers import events_of, job_row, message_rows, produce, request, worker_running
from tests.many_workers import launch_worker
from tests.scripted_llm import Reply


def test_commits_only_the_contiguous_settled_prefix():
    tracker = OffsetTracker()
    p = ("t", 0)
    for offset in (10, 11, 12):
        tracker.track(p, offset)
    tracker.settle(p, 11)
    tracker.settle(p, 12)
    assert tracker.take_commits() == {}  # 10 still running: nothing may commit
    tracker.settle(p, 10)
    assert tracker.take_commits() == {p: 13}
    assert tracker.take_commits() == {}


def test_partitions_are_independent_and_revocation_returns_pending_commits():
    tracker = OffsetTracker()
    a, b = ("t", 0), ("t", 1)
    tracker.track(a, 0)
    tracker.track(b, 5)
    tracker.settle(b, 5)
    assert tracker.revoke([b]) == {b: 6}
    tracker.settle(b, 5)  # late settle of a revoked partition: ignored
    assert tracker.take_commits() == {}
    tracker.settle(a, 0)
    assert tracker.take_commits() == {a: 1}


def wait_for_event(client, config, job_id: str, event: str, timeout_s: float = 60.0) -> None:
    key = config.job_keys(job_id).stream
    deadline = time.monotonic() + timeout_s
    after = "0-0"
    while time.monotonic() < deadline:
        for _, entries in client.xread({key: after}, block=1000) or []:
            for entry_id, fields in entries:
                after = entry_id
                if fields["event"] == event:
                    return
    raise TimeoutError(f"no {event} event for {job_id}")


async def test_worker_killed_between_redis_and_postgres_is_consumed_again(
        make_config, stack, llm, rds, db, tmp_path):
    config, path = make_config(extra="[jobs]\nlease_s = 2\n")
    # The second token comes a second after the first: time to freeze Postgres
    # mid-stream, so the answer completes but its terminal row cannot be written.
    llm.default = Reply(tokens=("first", " try"), token_delay_s=1.0)
    req = request("persist me")
    worker = launch_worker(path, tmp_path / "worker.log")
    try:
        produce(config, req)
        await trio.to_thread.run_sync(lambda: llm.wait_until(
            lambda calls: calls and calls[0].tokens_sent >= 1, 60))
        with stack.postgres.frozen():
            # `final` reaches Redis (it precedes the Postgres write); then the worker dies.
            await trio.to_thread.run_sync(wait_for_event, rds, config, req["jobId"], "final")
            worker.kill()
            worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert job_row(db, req["jobId"])["status"] == "running"
    assert len(llm.calls) == 1

    llm.default = Reply(tokens=("second", " try"))
    async with worker_running(config):
        # The request comes back from Kafka; the dead worker's lease expires; it runs again.
        events = await events_of(rds, config, req["jobId"])
        while events[-1]["attempt"] != "2":
            events = await events_of(rds, config, req["jobId"])
    attempt_two = [e for e in events if e["attempt"] == "2"]
    assert [e["event"] for e in attempt_two] == ["started", "final", "done"]
    # Attempt 1's answer was complete (its `final` is on the stream): attempt 2 keeps
    # all of it, settles it and never calls the model again (contract 3.3).
    assert attempt_two[0]["data"]["resumes"] == {"attempt": 1, "chars": len("first try")}
    assert [e["event"] for e in events].count("done") == 1
    first_final = next(e["data"] for e in events if e["event"] == "final")
    assert attempt_two[1]["data"] == first_final
    assert len(llm.calls) == 1
    row = job_row(db, req["jobId"])
    assert (row["status"], row["attempt"]) == ("completed", 2)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        first_final["usage"]["promptTokens"], first_final["usage"]["completionTokens"])
    assert [m["content"] for m in message_rows(db, req["jobId"])] == ["persist me",
                                                                      "first try"]


async def test_a_claim_postgres_refuses_settles_its_job_once_as_failed(config, llm, rds, db):
    # A refusal that is not a passing state would refuse every redelivery too: the job
    # ends failed with a minimal row and its offset settles, so the session's next job
    # runs and the request is not read again after a restart.
    poison, after = request("refused"), request("fine")
    after["sessionId"] = poison["sessionId"]  # same partition, behind it
    db.execute(f"""
        CREATE OR REPLACE FUNCTION refuse_claim() RETURNS trigger AS $$ BEGIN
            IF NEW.job_id = '{poison["jobId"]}' AND NEW.status = 'running' THEN
                RAISE EXCEPTION 'refused by a test trigger';
            END IF;
            RETURN NEW;
        END $$ LANGUAGE plpgsql""")
    try:
        async with worker_running(config):  # migrates: the table exists from here
            db.execute("CREATE TRIGGER refuse_claim BEFORE INSERT ON llm_jobs FOR EACH ROW "
                       "EXECUTE FUNCTION refuse_claim()")
            produce(config, poison, after)
            events = await events_of(rds, config, poison["jobId"])
            later = await events_of(rds, config, after["jobId"])
        async with worker_running(config):
            produce(config, request("after restart"))
            await trio.to_thread.run_sync(lambda: llm.wait_until(lambda c: len(c) == 2, 60))
    finally:
        db.execute("DROP TRIGGER IF EXISTS refuse_claim ON llm_jobs")
    assert [e["event"] for e in events] == ["error", "done"]
    assert events[0]["data"]["code"] == "internal"
    assert "test trigger" not in events[0]["data"]["message"]
    assert events[1]["data"] == {"status": "failed", "partial": False}
    row = job_row(db, poison["jobId"])
    assert row["status"] == "failed" and row["error"].startswith("internal: ")
    assert later[-1]["data"]["status"] == "completed"
    # Committed: the restarted worker did not read the refused request again.
    stream = rds.xrange(config.job_keys(poison["jobId"]).stream)
    assert [f["event"] for _, f in stream if f["jobId"] == poison["jobId"]] == ["error", "done"]
    assert [c.messages[-1]["content"] for c in llm.calls] == ["fine", "after restart"]


def test_a_failed_commit_is_offered_again_unless_the_partition_was_revoked():
    tracker = OffsetTracker()
    a, b = ("t", 0), ("t", 1)
    for partition in (a, b):
        tracker.track(partition, 0)
        tracker.settle(partition, 0)
    failed = tracker.take_commits()
    assert failed == {a: 1, b: 1}
    tracker.revoke([b])
    tracker.retry_commits(failed)  # the commit call failed (the broker was away)
    assert tracker.take_commits() == {a: 1}
