"""The intake outlives any one job: a job that raises what nobody expected is logged,
counted and run again, never dropped, and the next job runs (DESIGN 4.10)."""

from __future__ import annotations

import json
from functools import partial

import trio

from actors.intake import run_intake
from actors.offsets import OffsetTracker
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


async def test_a_job_that_raises_an_unexpected_error_does_not_stop_the_intake(autojump_clock):
    config = load_config(environ={})
    events_in, _ = trio.open_memory_channel(10)
    records_in, _ = trio.open_memory_channel(10)
    worker = Worker(config=config, worker_id="w", store=FakeStore(), chat=None,
                    pricing=FlatPricing(), tokens=WordCounting(), events=events_in,
                    records=records_in, event_log=NoEvents(), registry=JobRegistry(
                        tombstone_ttl_s=60))
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
