"""Worker: what every job of one worker process shares, passed in, never global.

Built once by the supervisor (the composition root, which picks the adapters
behind each port) and handed to the intake and each conversation.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import trio

from actors.aliases import Aliases
from actors.claims import Claims
from actors.health import Health
from actors.leases import LeaseKeeper
from actors.metrics import Metrics
from actors.ports import ChatModel, EventWriter, JobStore, Pricing, Telemetry, TokenCounting
from actors.registry import JobRegistry
from actors.retriever import Retrieval
from actors.telemetry import NoTelemetry
from config import Config
from messages.mailboxes import EventEmitted, JobRef, PgSinkMessage, Receipt
from messages.wire import EventBody

# How long cleanup that must happen (records, `done`, lease release) may take
# once the job itself is over or cancelled.
FINISH_GRACE_S = 30.0


class Finishing:
    """The shielded terminal writes of running jobs. While the worker runs, a job waits
    for its fenced terminal write however long Postgres is away (contract 6.11: it
    keeps its answer); once the worker stops, each gets `bound(seconds)` more."""

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self._limit_s: float | None = None

    @contextmanager
    def scope(self) -> Generator[trio.CancelScope]:
        scope = trio.CancelScope(shield=True)
        if self._limit_s is not None:
            scope.deadline = trio.current_time() + self._limit_s
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def bound(self, seconds: float) -> None:
        self._limit_s = seconds if self._limit_s is None else min(self._limit_s, seconds)
        deadline = trio.current_time() + seconds
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, deadline)


@dataclass
class Worker:
    config: Config
    worker_id: str  # written as llm_jobs.lease_owner: the lease holder of this worker's jobs
    store: JobStore
    chat: ChatModel
    pricing: Pricing
    tokens: TokenCounting
    events: trio.MemorySendChannel[EventEmitted]  # the redis_sink's mailbox
    records: trio.MemorySendChannel[PgSinkMessage]  # the pg_sink's mailbox
    event_log: EventWriter  # read side of the events: was a `done` written?
    registry: JobRegistry
    health: Health = field(default_factory=Health)
    retriever: Retrieval | None = None  # RAG mode; None: rag requests fail clearly
    leases: LeaseKeeper = field(default_factory=LeaseKeeper)
    finishing: Finishing = field(default_factory=Finishing)
    metrics: Metrics = field(default_factory=Metrics)
    # Takes secrets (API keys a vendor echoed back) out of text bound for events and rows.
    scrub: Callable[[str], str] = field(default=str)
    telemetry: Telemetry = field(default_factory=NoTelemetry)
    claims: Claims | None = None  # the claims actor; None: each job claims on its own
    # Aliases whose vendor refused an assistant prefill in this process: not continued.
    prefill_refused: set[str] = field(default_factory=set[str])

    @cached_property
    def aliases(self) -> Aliases:
        """The config's model aliases, resolved at first use (the intake's start)."""
        return Aliases.resolve(self.config, self.pricing, self.tokens)

    def job_ref(self, job_id: str, user_id: str, session_id: str, attempt: int = 1) -> JobRef:
        return JobRef(job_id=job_id, user_id=user_id, session_id=session_id, attempt=attempt,
                      stream_key=self.config.job_keys(job_id).stream)

    async def emit(self, job: JobRef, body: EventBody, *, wait: bool = False) -> None:
        """Send an event to the job's stream; with `wait`, return once it is in Redis."""
        receipt = Receipt() if wait else None
        await self.events.send(EventEmitted(job=job, body=body, receipt=receipt))
        if receipt is not None:
            await receipt.wait()
