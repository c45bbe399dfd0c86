"""The intake outlives any one job: a job that raises what nobody expected is logged,
counted and run again, never dropped, and the next job runs (contract 6.10)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from functools import partial

import trio

from actors.errors import TransientError
from actors.intake import run_intake
from actors.offsets import OffsetTracker
from actors.polling import POLL_TIMEOUT_S
from actors.registry import JobRegistry
from actors.worker import Worker
from config import load_config
from messages.wire import ChatRequest
from tests.fakes import FakeStore, FlatPricing, NoEvents, ScriptedRequests, WordCounting


def _worker(max_in_flight: int = 64, **jobs: object) -> Worker:
    environ = {f"CHAT_ACTORS__JOBS__{k.upper()}": str(v) for k, v in jobs.items()}
    config = load_config(environ={"CHAT_ACTORS__JOBS__MAX_IN_FLIGHT": str(max_in_flight),
                                  **environ})
    events_in, events_out = trio.open_memory_channel(100)
    records_in, records_out = trio.open_memory_channel(100)
    worker = Worker(config=config, worker_id="w", store=FakeStore(), chat=None,
                    pricing=FlatPricing(), tokens=WordCounting(), events=events_in,
                    records=records_in, event_log=NoEvents(),
                    registry=JobRegistry(tombstone_ttl_s=60))
    worker.sink_inboxes = (events_out, records_out)  # type: ignore[attr-defined]
    return worker


class Sinks:
    """Both sinks as fakes: each record is written at once, each event kept by job."""

    def __init__(self, worker: Worker) -> None:
        self.events_out, self.records_out = worker.sink_inboxes  # type: ignore[attr-defined]
        self.events: dict[str, list[tuple[float, object]]] = {}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._records)
            nursery.start_soon(self._events)

    async def _records(self) -> None:
        async for record in self.records_out:
            record.receipt.set()

    async def _events(self) -> None:
        async for emitted in self.events_out:
            self.events.setdefault(emitted.job.job_id, []).append(
                (trio.current_time(), emitted.body))
            if emitted.receipt is not None:
                emitted.receipt.set()


async def test_a_job_that_raises_an_unexpected_error_does_not_stop_the_intake(autojump_clock):
    worker = _worker()
    ran: list[str] = []

    async def job(request: ChatRequest, _: Worker, _parent: str | None) -> None:
        ran.append(request.job_id)
        if request.job_id == "buggy" and ran.count("buggy") == 1:
            raise KeyError("a bug in our own code")  # the first run only

    values = [json.dumps({"jobId": j, "userId": "u", "sessionId": j, "message": "m"}).encode()
              for j in ("buggy", "fine")]
    source, tracker, stop = ScriptedRequests(values), OffsetTracker(), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_intake, source, None, worker, tracker,
                                    stop=stop, run_job=job))
        await trio.sleep(5)
        stop.set()
    # The job that raised was run again (after a backoff) instead of being dropped,
    # which had stopped its partition's committed offset for the life of the process.
    assert sorted(ran) == ["buggy", "buggy", "fine"]
    assert tracker.unsettled() == 0 and source.commits[-1] == {("t", 0): 2}
    rendered = worker.metrics.render().decode()
    assert 'chat_actors_internal_errors_total{where="intake"} 1.0' in rendered


async def test_a_stuck_head_bounds_the_offsets_the_intake_tracks(autojump_clock):
    """While the first job of a partition cannot settle (its terminal write retried
    through an outage), the jobs after it settle and wait behind it. The tracker
    holds at most its limit: the intake fetches nothing more until the head moves."""
    worker = _worker(max_in_flight=4)
    head_may_settle = trio.Event()
    ran: list[str] = []

    async def job(request: ChatRequest, _: Worker, _parent: str | None) -> None:
        if request.job_id == "j0":
            await head_may_settle.wait()
        ran.append(request.job_id)

    values = [json.dumps({"jobId": f"j{i}", "userId": "u", "sessionId": f"s{i}",
                          "message": "m"}).encode() for i in range(40)]
    source, tracker, stop = ScriptedRequests(values), OffsetTracker(limit=10), trio.Event()
    most_tracked = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_intake, source, None, worker, tracker,
                                    stop=stop, run_job=job))
        for _ in range(100):  # the intake polls every poll_timeout: 100 rounds
            await trio.sleep(POLL_TIMEOUT_S)
            most_tracked = max(most_tracked, tracker.unsettled())
        assert len(ran) == 9 and source.paused  # j1..j9 settled, waiting behind j0
        assert most_tracked == 10 and not source.commits
        head_may_settle.set()
        while len(ran) < 40:
            await trio.sleep(POLL_TIMEOUT_S)
            most_tracked = max(most_tracked, tracker.unsettled())
        stop.set()
    assert most_tracked == 10
    assert tracker.unsettled() == 0 and source.commits[-1] == {("t", 0): 40}


@contextlib.asynccontextmanager
async def intake_with_sinks(worker: Worker, source: ScriptedRequests, tracker: OffsetTracker,
                            job) -> AsyncIterator[Sinks]:
    """The intake running `job` for what `source` delivers, with both sinks faked; on
    exit it is stopped, and given 30 s (of the mock clock) to drain."""
    sinks, stop = Sinks(worker), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sinks.run)
        await nursery.start(partial(run_intake, source, None, worker, tracker,
                                    stop=stop, run_job=job))
        yield sinks
        stop.set()
        nursery.cancel_scope.deadline = trio.current_time() + 30


def _request(job_id: str, session: str) -> bytes:
    return json.dumps({"jobId": job_id, "userId": "u", "sessionId": session,
                       "message": "m"}).encode()


async def test_requests_waiting_behind_their_session_hold_no_in_flight_slot(autojump_clock):
    """One session with a running job and five queued behind it must not keep another
    session's job out: only running jobs count against max_in_flight."""
    worker = _worker(max_in_flight=2)
    release = trio.Event()
    started: dict[str, float] = {}

    async def job(request: ChatRequest, _: Worker, _parent: str | None) -> None:
        started[request.job_id] = trio.current_time()
        if request.job_id == "a0":
            await release.wait()

    values = [_request(f"a{i}", "A") for i in range(6)] + [_request("b0", "B")]
    async with intake_with_sinks(worker, ScriptedRequests(values), OffsetTracker(), job):
        await trio.sleep(10)
        assert sorted(started) == ["a0", "b0"]  # a1..a5 wait; b0 ran beside a0
        release.set()
        await trio.sleep(10)
    assert sorted(started) == ["a0", "a1", "a2", "a3", "a4", "a5", "b0"]
    assert [started[f"a{i}"] <= started[f"a{i + 1}"] for i in range(5)] == [True] * 5


async def test_a_full_session_queue_and_a_long_wait_are_refused_as_session_busy(autojump_clock):
    """queue_max 2: a third request waiting is refused at once. session_wait_s 30: a
    request still waiting after 30 s is refused then, and the one behind it still
    waits for the running job (the session's order holds)."""
    worker = _worker(session_queue_max=2, session_wait_s=30)
    ended: dict[str, float] = {}
    started: dict[str, float] = {}

    async def job(request: ChatRequest, _: Worker, _parent: str | None) -> None:
        started[request.job_id] = trio.current_time()
        if request.job_id == "a0":
            await trio.sleep(40)
        ended[request.job_id] = trio.current_time()

    source = ScriptedRequests([(0, _request("a0", "A")), (0, _request("a1", "A")),
                              (20, _request("a2", "A")), (20, _request("a3", "A"))])
    tracker = OffsetTracker()
    async with intake_with_sinks(worker, source, tracker, job) as sinks:
        await trio.sleep(100)

    def refused(job_id: str) -> float:
        (t_error, error), (_, done) = sinks.events[job_id]
        assert (error.code, error.retryable, done.status) == ("session_busy", True, "rejected")
        return t_error

    assert sorted(started) == ["a0", "a2"]
    assert 20 <= refused("a3") < 21  # a1 and a2 already waited: the queue was full
    assert 30 <= refused("a1") < 31  # waited its 30 s behind a0
    assert started["a2"] >= ended["a0"] >= 40  # not when a1 gave up at 30: after a0
    assert "a0" not in sinks.events and tracker.unsettled() == 0
    rendered = worker.metrics.render().decode()
    assert 'chat_actors_rejections_total{reason="session_busy"} 2.0' in rendered


async def test_a_failed_commit_is_made_again_though_no_more_messages_come(autojump_clock):
    worker = _worker()

    async def job(request: ChatRequest, _: Worker, _parent: str | None) -> None:
        pass

    failure = TransientError("kafka: Commit failed: Broker: Unknown member")
    source = ScriptedRequests([_request("only", "s")], commit_errors=[failure])
    tracker, stop = OffsetTracker(), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_intake, source, None, worker, tracker,
                                    stop=stop, run_job=job))
        await trio.sleep(5)
        assert source.commit_errors == [] and source.commits == [{("t", 0): 1}]
        stop.set()
