"""The job registry: which jobs run here, whose they are, and cancels waiting for a job.

A cancel is honoured only from the job's user (DESIGN 1.2). A cancel for a job
not running here becomes a tombstone for `tombstone_ttl_s`: the gateway may
send it before the request reaches us, or the job may run on another worker
and come back here on redelivery. Pure bookkeeping on Trio's clock, no I/O.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

import trio

log = logging.getLogger("chat_actors.registry")

MAX_TOMBSTONES = 100_000


class CancelOutcome(Enum):
    CANCELLED = "cancelled"  # a running job of this user was cancelled
    FOREIGN = "foreign"  # the job runs here, but for another user: nothing changed
    TOMBSTONED = "tombstoned"  # not running here: kept for when it is admitted


@dataclass
class RunningJob:
    job_id: str
    user_id: str
    attempt: int = 1
    # Answers one question, "did the job's user cancel it?": the registry cancels it,
    # the conversation runs the job inside it (its deadline is a scope of its own).
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cancel_reason: str = ""  # for the log line


@dataclass(frozen=True)
class _Tombstone:
    user_id: str
    reason: str
    expires_at: float


class JobRegistry:
    def __init__(self, *, tombstone_ttl_s: float) -> None:
        self._ttl = tombstone_ttl_s
        self._running: dict[str, RunningJob] = {}
        self._tombstones: OrderedDict[str, _Tombstone] = OrderedDict()

    def _prune(self) -> None:
        now = trio.current_time()
        while self._tombstones:
            job_id, stone = next(iter(self._tombstones.items()))
            if stone.expires_at > now and len(self._tombstones) <= MAX_TOMBSTONES:
                break
            del self._tombstones[job_id]

    def admit(self, job_id: str, user_id: str, attempt: int = 1) -> RunningJob:
        """Register a job about to run. If its user already cancelled it, its cancel
        scope is cancelled before it starts."""
        self._prune()
        job = RunningJob(job_id=job_id, user_id=user_id, attempt=attempt)
        stone = self._tombstones.pop(job_id, None)
        if stone is not None:
            if stone.user_id == user_id:
                self._cancel(job, stone.reason or "cancelled before it started")
            else:
                log.warning("job %s: ignoring a cancel from %s, the job belongs to %s",
                            job_id, stone.user_id, user_id)
        self._running[job_id] = job
        return job

    def finish(self, job: RunningJob) -> None:
        if self._running.get(job.job_id) is job:
            del self._running[job.job_id]

    def cancel(self, job_id: str, user_id: str, reason: str) -> CancelOutcome:
        job = self._running.get(job_id)
        if job is None:
            self._prune()
            self._tombstones[job_id] = _Tombstone(user_id, reason,
                                                  trio.current_time() + self._ttl)
            self._tombstones.move_to_end(job_id)
            return CancelOutcome.TOMBSTONED
        if job.user_id != user_id:
            return CancelOutcome.FOREIGN
        self._cancel(job, reason or "cancelled by the user")
        return CancelOutcome.CANCELLED

    def stop(self, job_id: str, reason: str, attempt: int | None = None) -> None:
        """Stop a running job whoever its user: a later attempt holds it (its lease was
        lost, or Redis refused its events), so it must not go on calling the model or
        writing (DESIGN 4.11). With `attempt`, only if that attempt is the one running."""
        job = self._running.get(job_id)
        if job is not None and (attempt is None or job.attempt == attempt):
            self._cancel(job, reason)

    @staticmethod
    def _cancel(job: RunningJob, reason: str) -> None:
        if not job.cancel_scope.cancel_called:
            job.cancel_reason = reason
        job.cancel_scope.cancel()

    def running(self) -> int:
        return len(self._running)

    def tombstones(self) -> int:
        self._prune()
        return len(self._tombstones)
