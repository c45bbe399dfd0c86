"""The intake outlives any one job: a job that raises what nobody expected is logged,
counted and run again, never dropped, and the next job runs (DESIGN 4.10)."""

from __future__ import annotations

import json
from functools import partial

import trio

from actors.intake import run_intake
from actors.offsets import OffsetTracker
from actors.polling import POLL_TIMEOUT_S
from actors.registry import JobRegistry
from actors.worker import Worker
from config import load_config
from messages.mailboxes import Delivery
from messages.wire import ChatRequest
from tests.fakes import FakeStore, FlatPricing, NoEvents, WordCounting


class OneBatch:
    """A RequestSource that delivers `values` once, then nothing."""

    def __init__(self, values: list[bytes]) -> None:
        self.batch = [Delivery(topic="t", partition=0, offset=i, key=None, value=v)
                      for i, v in enumerate(values)]
        self.commits: list[dict] = []

    async def poll(self, max_records: int, timeout_s: float) -> list[Delivery]:
        await trio.sleep(timeout_s)
        batch, self.batch = self.batch[:max_records], self.batch[max_records:]
        return batch

    async def commit(self, offsets) -> None:
        self.commits.append(dict(offsets))

    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def seek(self, deliveries) -> None: ...
    async def close(self) -> None: ...


def _worker(max_in_flight: int = 64) -> Worker:
    config = load_config(environ={"CHAT_ACTORS__JOBS__MAX_IN_FLIGHT": str(max_in_flight)})
    events_in, _ = trio.open_memory_channel(10)
    records_in, _ = trio.open_memory_channel(10)
    return Worker(config=config, worker_id="w", store=FakeStore(), chat=None,
                  pricing=FlatPricing(), tokens=WordCounting(), events=events_in,
                  records=records_in, event_log=NoEvents(),
                  registry=JobRegistry(tombstone_ttl_s=60))


async def test_a_job_that_raises_an_unexpected_error_does_not_stop_the_intake(autojump_clock):
    worker = _worker()
    ran: list[str] = []

    async def job(request: ChatRequest, _: Worker) -> None:
        ran.append(request.job_id)
        if request.job_id == "buggy" and ran.count("buggy") == 1:
            raise KeyError("a bug in our own code")  # the first run only

    values = [json.dumps({"jobId": j, "userId": "u", "sessionId": j, "message": "m"}).encode()
              for j in ("buggy", "fine")]
    source, tracker, stop = OneBatch(values), OffsetTracker(), trio.Event()
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


class PausingBatch(OneBatch):
    """OneBatch that delivers nothing while paused, and hands back what it is told to seek."""

    def __init__(self, values: list[bytes]) -> None:
        super().__init__(values)
        self.paused = False
        self.most_tracked = 0

    async def poll(self, max_records: int, timeout_s: float) -> list[Delivery]:
        if self.paused:
            await trio.sleep(timeout_s)
            return []
        return await super().poll(max_records, timeout_s)

    async def pause(self) -> None:
        self.paused = True

    async def resume(self) -> None:
        self.paused = False

    async def seek(self, deliveries) -> None:
        self.batch = [*deliveries, *self.batch]


async def test_a_stuck_head_bounds_the_offsets_the_intake_tracks(autojump_clock):
    """While the first job of a partition cannot settle (its terminal write retried
    through an outage), the jobs after it settle and wait behind it. The tracker
    holds at most its limit: the intake fetches nothing more until the head moves."""
    worker = _worker(max_in_flight=4)
    head_may_settle = trio.Event()
    ran: list[str] = []

    async def job(request: ChatRequest, _: Worker) -> None:
        if request.job_id == "j0":
            await head_may_settle.wait()
        ran.append(request.job_id)

    values = [json.dumps({"jobId": f"j{i}", "userId": "u", "sessionId": f"s{i}",
                          "message": "m"}).encode() for i in range(40)]
    source, tracker, stop = PausingBatch(values), OffsetTracker(limit=10), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_intake, source, None, worker, tracker,
                                    stop=stop, run_job=job))
        for _ in range(100):  # the intake polls every poll_timeout: 100 rounds
            await trio.sleep(POLL_TIMEOUT_S)
            source.most_tracked = max(source.most_tracked, tracker.unsettled())
        assert len(ran) == 9 and source.paused  # j1..j9 settled, waiting behind j0
        assert source.most_tracked == 10 and not source.commits
        head_may_settle.set()
        while len(ran) < 40:
            await trio.sleep(POLL_TIMEOUT_S)
            source.most_tracked = max(source.most_tracked, tracker.unsettled())
        stop.set()
    assert source.most_tracked == 10
    assert tracker.unsettled() == 0 and source.commits[-1] == {("t", 0): 40}
