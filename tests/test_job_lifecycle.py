"""Jobs across workers and time (contract 6.1, 4.4, 4.6, 4.8): session order, leases and
attempts, redelivery, timeouts against a real slow server, SIGKILL and SIGTERM."""

from __future__ import annotations

import signal
from contextlib import asynccontextmanager

import trio

from tests.helpers import (
    events_of,
    job_row,
    produce,
    request,
    stop_process,
    wait_calls,
    worker_running,
)
from tests.many_workers import launch_worker
from tests.scripted_llm import Reply


@asynccontextmanager
async def process_streaming(config, config_path, log_path, llm, req, tokens: int, **env: str):
    """A worker process (`env` added to its environment) that has streamed `tokens` tokens
    of `req`; killed on exit if alive."""
    worker = launch_worker(config_path, log_path, **env)
    try:
        produce(config, req)
        await wait_calls(llm, lambda calls: calls and calls[0].tokens_sent >= tokens)
        yield worker
    finally:
        stop_process(worker)


async def test_one_session_runs_in_order_and_sessions_run_concurrently(config, llm, rds):
    llm.default = Reply(tokens=tuple(f"w{i} " for i in range(10)), token_delay_s=0.2)
    first = request("one", sessionId="same")
    second = request("two", sessionId="same")
    other = request("elsewhere", sessionId="other")
    async with worker_running(config):
        produce(config, first, second, other)
        # `other` is called while `first` still streams: sessions do not wait for each other.
        await wait_calls(llm, lambda calls: {c.messages[-1]["content"] for c in calls}
                         >= {"one", "elsewhere"})
        assert not next(c for c in llm.calls if c.messages[-1]["content"] == "one").finished
        for job in (first, second, other):
            await events_of(rds, config, job["jobId"])
    two = next(c for c in llm.calls if c.messages[-1]["content"] == "two")
    # `two` waited for `one` and sees it in its history.
    assert [m["content"] for m in two.messages[1:-1]] == [
        "one", "".join(f"w{i} " for i in range(10))]


async def test_redelivery_of_a_completed_job_calls_no_model(config, llm, rds, db):
    job = request("only once", sessionId="dup")
    sentinel = request("after the duplicate", sessionId="dup")
    async with worker_running(config):
        produce(config, job)
        await events_of(rds, config, job["jobId"])
        produce(config, job, sentinel)  # same session: the sentinel runs after the duplicate
        await events_of(rds, config, sentinel["jobId"])
    assert [c.messages[-1]["content"] for c in llm.calls] == ["only once", "after the duplicate"]
    key = config.job_keys(job["jobId"]).stream
    assert [f["event"] for _, f in rds.xrange(key)].count("done") == 1
    assert job_row(db, job["jobId"])["attempt"] == 1


async def test_a_job_longer_than_max_poll_interval_causes_no_rebalance(make_config, llm, rds):
    config, _ = make_config(extra='[kafka.consumer]\n"max.poll.interval.ms" = 2500\n')
    llm.default = Reply(tokens=tuple(f"{i} " for i in range(12)), token_delay_s=0.5)
    req = request("slow but steady")
    async with worker_running(config) as worker:
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
        assert worker.consumer.revocations == 0
    assert events[-1]["data"]["status"] == "completed" and len(llm.calls) == 1


async def test_a_real_stalled_server_hits_the_first_token_timeout(make_config, llm, rds, db):
    config, _ = make_config(extra="[jobs]\nfirst_token_timeout_s = 1\n")
    llm.default = Reply(first_token_delay_s=3)
    req = request("are you there?")
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    assert events[-2]["event"] == "error" and events[-2]["data"]["code"] == "first_token_timeout"
    assert events[-1]["data"] == {"status": "timeout", "partial": False}
    assert job_row(db, req["jobId"])["status"] == "timeout"
    await wait_calls(llm, lambda calls: calls[0].disconnected, 10)


async def test_a_request_timeout_ends_a_real_slow_stream_with_its_partial_answer(
        config, llm, rds, db):
    llm.default = Reply(tokens=tuple(f"{i} " for i in range(100)), token_delay_s=0.1)
    req = request("take your time", timeoutS=1)
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    assert events[-2]["data"]["code"] == "timeout"
    assert events[-1]["data"] == {"status": "timeout", "partial": True}
    row = job_row(db, req["jobId"])
    assert (row["status"], row["partial"]) == ("timeout", True)
    await wait_calls(llm, lambda calls: calls[0].disconnected, 10)
    assert llm.calls[0].tokens_sent < 100


async def test_sigterm_completes_short_jobs_and_hands_long_ones_back(
        make_config, llm, rds, db, tmp_path):
    config, path = make_config()
    path.write_text(path.read_text().replace("grace_s = 5", "grace_s = 3"))
    short = request("short", sessionId="s-short")
    long = request("long", sessionId="s-long")
    long_tokens = tuple(f"{i} " for i in range(200))
    llm.queue(Reply(tokens=tuple(f"{i} " for i in range(5)), token_delay_s=0.2))
    llm.default = Reply(tokens=long_tokens, token_delay_s=0.2, continues=True)
    worker = launch_worker(path, tmp_path / "worker.log")
    try:
        produce(config, short)
        await wait_calls(llm, lambda calls: len(calls) == 1)
        produce(config, long)
        await wait_calls(llm, lambda calls: len(calls) == 2 and calls[1].tokens_sent >= 1)
        worker.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(lambda: worker.wait(60))
    finally:
        stop_process(worker)
    assert code == 0
    short_events = await events_of(rds, config, short["jobId"])
    assert short_events[-1]["data"]["status"] == "completed"
    long_row = job_row(db, long["jobId"])
    assert (long_row["status"], long_row["lease_owner"]) == ("queued", None)  # handed back
    # The vendor sees the hang-up at its next write (up to one token delay later).
    await trio.to_thread.run_sync(lambda: llm.wait_until(lambda calls: calls[1].disconnected, 10))

    llm.default = Reply(tokens=long_tokens, continues=True)
    async with worker_running(config):
        long_events = await events_of(rds, config, long["jobId"])
    # Attempt 2 continues the answer (tests/test_takeover.py has the details).
    assert long_events[-2]["data"]["text"] == "".join(long_tokens)
    assert long_events[-2]["attempt"] == "2"
    assert [e["event"] for e in long_events].count("done") == 1
    # The short job's offset was committed: it was not run again.
    assert [c.messages[-1]["content"] for c in llm.calls][:2] == ["short", "long"]
    assert [c.messages[-1]["role"] for c in llm.calls][2:] == ["assistant"]
    assert {job_row(db, j["jobId"])["status"] for j in (short, long)} == {"completed"}


async def test_a_second_signal_stops_at_once_and_hands_the_job_back(
        make_config, llm, rds, db, tmp_path):
    config, path = make_config()
    path.write_text(path.read_text().replace("grace_s = 5", "grace_s = 600"))
    llm.default = Reply(tokens=tuple(f"{i} " for i in range(500)), token_delay_s=0.1)
    req = request("endless")
    log = tmp_path / "worker.log"
    async with process_streaming(config, path, log, llm, req, 1) as worker:
        worker.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(lambda: _wait_for_text(log, "draining"))
        worker.send_signal(signal.SIGTERM)
        # Far below the 600 s grace: the second signal did not wait for the job.
        code = await trio.to_thread.run_sync(lambda: worker.wait(60))
    assert code == 0
    row = job_row(db, req["jobId"])
    assert (row["status"], row["lease_owner"]) == ("queued", None)


def _wait_for_text(path, text: str, timeout_s: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while text not in path.read_text():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in {path}")
        time.sleep(0.05)


async def test_a_done_lost_after_postgres_is_resent_continuing_the_sequence(make_config, llm,
                                                                             rds):
    # The redelivery waits a lease for the `done` of the worker that ended the job
    # before taking it for lost: a short lease keeps the test short.
    config, _ = make_config(extra="[jobs]\nlease_s = 2\n")
    req = request("finish me")
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
        # Make Redis look as a crash between the Postgres commit and the `done` left it.
        keys = config.job_keys(req["jobId"])
        done = events[-1]
        rds.xdel(keys.stream, done["id"])
        rds.delete(keys.done)
        rds.set(keys.seq(1), int(done["seq"]) - 1)
        produce(config, req)  # the redelivery
        again = await events_of(rds, config, req["jobId"])
    assert len(llm.calls) == 1  # terminal in Postgres: no second model call
    assert [int(e["seq"]) for e in again] == list(range(len(events)))
    assert again[-1]["event"] == "done" and again[-1]["data"]["status"] == "completed"
