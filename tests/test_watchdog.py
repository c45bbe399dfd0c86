"""The step watchdog names the task that stalled the event loop, in /metrics."""

from __future__ import annotations

import time

import trio

from actors.metrics import Metrics
from actors.watchdog import SLOW_STEP_S, StepWatch


async def test_a_step_without_a_checkpoint_is_measured_and_named():
    metrics = Metrics()
    watch = StepWatch(metrics)

    async def unbounded_parser() -> None:
        # CPU work on one input with no checkpoint in between.
        busy_until = time.perf_counter() + SLOW_STEP_S * 1.5
        while time.perf_counter() < busy_until:
            pass

    async def well_behaved() -> None:
        for _ in range(100):
            await trio.lowlevel.checkpoint()

    trio.lowlevel.add_instrument(watch)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(well_behaved)
            nursery.start_soon(unbounded_parser)
    finally:
        trio.lowlevel.remove_instrument(watch)
    assert watch.longest_s >= SLOW_STEP_S * 1.5
    assert watch.longest_task.endswith("unbounded_parser"), watch.longest_task
    text = metrics.render().decode()
    assert "chat_actors_slow_steps_total 1.0" in text
    assert 'chat_actors_longest_step_seconds{task="' in text and "unbounded_parser" in text
