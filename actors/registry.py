"""The job registry: which jobs run here, whose they are, and cancels waiting for a job.

A cancel is honoured only from the job's user (contract 2.2). A cancel for a job
not running here becomes a tombstone: the gateway may send it before the request
reaches us, the job may wait behind its session, or it may run on another worker
and come back here on redelivery. Tombstones are kept per (job, user), so a cancel
naming another user's job never replaces the owner's; they live `tombstone_ttl_s` (the
configured TTL plus the longest session wait) and are bounded per user and in
total, the oldest going first. Pure bookkeeping on Trio's clock, no I/O.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import trio

log = logging.getLogger("chat_actors.registry")

MAX_TOMBSTONES = 20_000  # in total, about 10 MB at the longest ids and reasons
MAX_TOMBSTONES_PER_USER = 200  # one user's flood evicts only its own
MAX_REASON_CHARS = 200


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
    reason: str
    expires_at: float


class JobRegistry:
    def __init__(self, *, tombstone_ttl_s: float, max_total: int = MAX_TOMBSTONES,
                 max_per_user: int = MAX_TOMBSTONES_PER_USER,
                 on_evict: Callable[[], None] | None = None) -> None:
        self._ttl = tombstone_ttl_s
        self._max_total = max_total
        self._max_per_user = max_per_user
        self._on_evict = on_evict or (lambda: None)
        self._running: dict[str, RunningJob] = {}
        # (job, user) -> tombstone, oldest first; and each user's, oldest first.
        self._tombstones: OrderedDict[tuple[str, str], _Tombstone] = OrderedDict()
        self._of_user: dict[str, OrderedDict[str, None]] = {}

    def _drop(self, key: tuple[str, str]) -> _Tombstone | None:
        stone = self._tombstones.pop(key, None)
        if stone is not None:
            job_id, user_id = key
            mine = self._of_user[user_id]
            del mine[job_id]
            if not mine:
                del self._of_user[user_id]
        return stone

    def _prune(self) -> None:
        now = trio.current_time()
        while self._tombstones:
            key, stone = next(iter(self._tombstones.items()))
            if stone.expires_at > now and len(self._tombstones) <= self._max_total:
                break
            self._drop(key)
            if stone.expires_at > now:
                self._on_evict()

    def admit(self, job_id: str, user_id: str, attempt: int = 1) -> RunningJob:
        """Register a job about to run. If its user already cancelled it, its cancel
        scope is cancelled before it starts."""
        self._prune()
        job = RunningJob(job_id=job_id, user_id=user_id, attempt=attempt)
        stone = self._drop((job_id, user_id))
        if stone is not None:
            self._cancel(job, stone.reason or "cancelled before it started")
        self._running[job_id] = job
        return job

    def finish(self, job: RunningJob) -> None:
        if self._running.get(job.job_id) is job:
            del self._running[job.job_id]

    def cancel(self, job_id: str, user_id: str, reason: str) -> CancelOutcome:
        job = self._running.get(job_id)
        if job is None:
            self._tombstone(job_id, user_id, reason)
            return CancelOutcome.TOMBSTONED
        if job.user_id != user_id:
            return CancelOutcome.FOREIGN
        self._cancel(job, reason or "cancelled by the user")
        return CancelOutcome.CANCELLED

    def _tombstone(self, job_id: str, user_id: str, reason: str) -> None:
        key = (job_id, user_id)
        self._drop(key)  # a repeated cancel renews it
        self._tombstones[key] = _Tombstone(reason[:MAX_REASON_CHARS],
                                           trio.current_time() + self._ttl)
        mine = self._of_user.setdefault(user_id, OrderedDict())
        mine[job_id] = None
        if len(mine) > self._max_per_user:
            self._drop((next(iter(mine)), user_id))
            self._on_evict()
        self._prune()

    def stop(self, job_id: str, reason: str, attempt: int | None = None) -> None:
        """Stop a running job whoever its user: a later attempt holds it (its lease was
        lost, or Redis refused its events), so it must not go on calling the model or
        writing (contract 6.11). With `attempt`, only if that attempt is the one running."""
        job = self._running.get(job_id)
        if job is not None and (attempt is None or job.attempt == attempt):
            self._cancel(job, reason)

    def moved_on(self, job_id: str, attempt: int) -> None:
        """The running job started over as `attempt` (a restart inside the worker)."""
        job = self._running.get(job_id)
        if job is not None:
            job.attempt = attempt

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
