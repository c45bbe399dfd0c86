"""Ownership (contract 2.2): nothing is written to a job's stream, row or history unless
the job belongs to the sender, and a rejected request never takes a job id away."""

from __future__ import annotations

import json

import trio

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


def stream(rds, config, job_id: str) -> list[dict]:
    return [{**fields, "data": json.loads(fields["data"])}
            for _, fields in rds.xrange(config.job_keys(job_id).stream)]


def bad_request(job_id: str, user_id: str) -> bytes:
    """A request naming a job and a user but missing its message: rejected as bad input."""
    return json.dumps({"jobId": job_id, "userId": user_id, "sessionId": "s-bad"}).encode()


async def test_a_bad_request_naming_another_users_running_job_writes_nothing_to_it(
        config, llm, rds, db):
    llm.default = Reply(tokens=tuple(f"t{i} " for i in range(20)), token_delay_s=0.1)
    alice = request("a long answer, please")
    async with worker_running(config) as worker:
        produce(config, alice)
        await trio.to_thread.run_sync(lambda: llm.wait_until(
            lambda calls: calls and calls[-1].tokens_sent >= 1, 30))
        produce(config, bad_request(alice["jobId"], "mallory"))
        # Both settled (alice's answer takes 2 s; mallory's is handled in milliseconds).
        await until(lambda: (job_row(db, alice["jobId"]) or {}).get("status") == "completed"
                    and worker.tracker.unsettled() == 0)
    events = stream(rds, config, alice["jobId"])
    assert [e["event"] for e in events].count("error") == 0
    assert [e["data"]["status"] for e in events if e["event"] == "done"] == ["completed"]
    row = job_row(db, alice["jobId"])
    assert (row["user_id"], row["status"]) == ("alice", "completed")


async def test_a_rejected_request_never_takes_a_job_id_from_its_owner(config, llm, rds, db):
    """mallory's bad request names the id first and is told it was rejected; alice's
    valid request with that id then runs, and her stream holds only her answer."""
    llm.default = Reply(tokens=("mine", " alone"))
    job_id = request()["jobId"]
    async with worker_running(config):
        produce(config, bad_request(job_id, "mallory"))
        rejected = await events_of(rds, config, job_id)
        assert [e["event"] for e in rejected] == ["error", "done"]
        assert rejected[-1]["data"]["status"] == "rejected"
        produce(config, request("hello", jobId=job_id))
        await until(lambda: (job_row(db, job_id) or {}).get("status") == "completed")
        await until(lambda: stream(rds, config, job_id)[-1:] != []
                    and stream(rds, config, job_id)[-1]["event"] == "done")
    events = stream(rds, config, job_id)
    assert "error" not in [e["event"] for e in events]
    assert events[0]["event"] == "started" and events[-1]["data"]["status"] == "completed"
    row = job_row(db, job_id)
    assert (row["user_id"], row["attempt"], row["error"]) == ("alice", 2, None)
    assert [m["content"] for m in message_rows(db, job_id)] == ["hello", "mine alone"]
