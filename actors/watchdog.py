"""watchdog: how long any task ran between two checkpoints, for /metrics.

A Trio task that does unbounded work on one input (a parser in a loop, a huge
regex) stalls every stream, lease renewal and probe of the worker. This
instrument records the longest such stretch and the task that ran it, and counts
the steps over SLOW_STEP_S, so that shows up in /metrics before it hurts.
"""

from __future__ import annotations

from time import perf_counter

import trio

from actors.metrics import Metrics

SLOW_STEP_S = 0.1


class StepWatch(trio.abc.Instrument):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._step_started: float | None = None  # None: a step began before we were added
        self.longest_s = 0.0
        self.longest_task = ""

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._step_started = perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._step_started is None:
            return
        took = perf_counter() - self._step_started
        self._step_started = None
        if took > SLOW_STEP_S:
            self._metrics.slow_steps.inc()
        if took > self.longest_s:
            self.longest_s, self.longest_task = took, task.name
            self._metrics.longest_step.clear()
            self._metrics.longest_step.labels(task=task.name).set(took)
