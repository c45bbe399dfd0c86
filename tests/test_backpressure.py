"""Backpressure (DESIGN 4.7): a burst of 10 x max_in_flight stays bounded and completes."""

from __future__ import annotations

from tests.helpers import events_of, job_row, produce, request, until, worker_running
from tests.scripted_llm import Reply


async def test_a_burst_keeps_in_flight_bounded_and_completes_everything(make_config, llm, rds,
                                                                         db):
    config, _ = make_config(environ={"CHAT_ACTORS__JOBS__MAX_IN_FLIGHT": "3"})
    llm.default = Reply(tokens=("a", "b", "c"), token_delay_s=0.05)
    burst = [request(f"job {i}") for i in range(30)]
    async with worker_running(config) as worker:
        produce(config, *burst)
        for job in burst:
            events = await events_of(rds, config, job["jobId"])
            assert events[-1]["data"]["status"] == "completed"
        await until(lambda: worker.tracker.unsettled() == 0)
    assert len(llm.calls) == 30
    assert llm.max_active <= 3  # never more model calls at once than max_in_flight
    assert all(job_row(db, job["jobId"])["status"] == "completed" for job in burst)
