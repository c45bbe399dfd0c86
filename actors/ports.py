"""What the actors need from the world, as Protocols. Adapters implement them;
unit tests implement small fakes of them (tests/fakes.py). The values that cross
a port live in messages/, so nothing here, and no actor, imports an adapter.

`lease_holder` is always this worker's id, the one written as llm_jobs.lease_owner.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
import trio

from messages.mailboxes import Delivery, JobFinished, JobRejected, Partition, ProviderChunk
from messages.ports import (
    Capabilities,
    ClaimOrder,
    ClaimResult,
    Handed,
    Hit,
    Hold,
    Rates,
    Refused,
    Streamed,
    StreamEntry,
    TokenCounts,
)
from messages.telemetry import JobTelemetry


class EventWriter(Protocol):
    async def write(self, entries: Sequence[StreamEntry]) -> set[tuple[str, int]]:
        """Append the entries; return the (job id, attempt) of those not written because
        a later attempt holds the job (contract 6.11)."""
        ...
    async def done_recorded(self, job_id: str) -> bool: ...
    async def last_seq(self, job_id: str, attempt: int) -> int: ...
    async def hand_over(self, job_id: str, attempt: int) -> None:
        """Clear what a rejected request wrote for a job id a valid one now claims."""
        ...
    async def take_over(self, job_id: str, attempt: int) -> list[Streamed] | None:
        """Fence the job's earlier attempts out (nothing they append lands after this),
        then read back what its stream holds; None when the job's events share a stream
        with other jobs' (it is not read back)."""
        ...
    async def fenced(self, job_id: str, attempt: int) -> bool:
        """Is the job not `attempt`'s to run any more: a later attempt holds it, or its
        `done` is written? One round trip, before every model call."""
        ...


class RecordWriter(Protocol):
    async def write_records(self, records: Sequence[JobFinished | JobRejected],
                            lease_holder: str) -> set[str]:
        """Write a batch in one transaction; return the ids of jobs whose terminal
        record did not land: a later attempt holds the job (contract 6.11), or, for a
        rejection, the job id belongs to a job it must not touch."""
        ...


class JobStore(Protocol):
    async def claim(self, *, job_id: str, user_id: str, session_id: str, trace_id: str,
                    mode: str, model: str, provider: str, lease_holder: str,
                    lease_s: float, history_limit: int = 0, api_key_id: str | None = None,
                    end_user: str | None = None,
                    metadata: dict[str, str] | None = None) -> ClaimResult: ...
    async def claim_many(self, orders: Sequence[ClaimOrder], *, lease_holder: str,
                         lease_s: float, history_limit: int = 0) -> list[ClaimResult]:
        """Each order's claim, in order, in one round trip (job ids all different)."""
        ...
    async def renew_leases(self, *, job_ids: Sequence[str], lease_holder: str,
                           lease_s: float) -> set[str]: ...  # the ids still its own
    async def next_attempt(self, *, job_id: str, lease_holder: str, attempt: int) -> bool:
        """The job, held by `lease_holder` as `attempt`, starts over as attempt + 1 under
        the same lease (an answer restarted inside the worker); False: not held so."""
        ...
    async def release_lease(self, *, job_id: str, lease_holder: str,
                            handed: Handed | None = None) -> None:
        """Give the job back unfinished, with what its attempt leaves the next one."""
        ...
    async def reserve(self, *, job_id: str, lease_holder: str, holds: Sequence[Hold],
                      period: str) -> Refused | None: ...
    async def prune_ledger(self, *, period: str) -> int: ...  # windows deleted
    async def images(self, *, user_id: str, hashes: Iterable[str]) -> dict[str, tuple[str, bytes]]:
        """The user's stored images by content hash: (media type, bytes); those not
        stored are left out."""
        ...


class ChatModel(Protocol):
    """Streams one completion into `out`. `resend` is asked before a request that may
    have reached the vendor is sent again (a kept-alive connection lost before any
    answer): True sends it, and it counts as a retry."""

    async def stream(self, *, model: str, api_base: str | None, api_key_env: str | None,
                     messages: list[dict[str, str]], params: Mapping[str, Any],
                     out: trio.MemorySendChannel[ProviderChunk],
                     stream_path: str = "auto",
                     resend: Callable[[str], Awaitable[bool]] | None = None) -> None: ...


class Pricing(Protocol):
    """What a model costs and who serves it (LiteLLM's price map and routing)."""

    def cost_usd(self, model: str, used: TokenCounts, own: Rates) -> float | None:
        """What `used` costs on `model` (contract 3), each rate `own` sets overriding the
        price map's; None when neither prices the model."""
        ...
    def provider_of(self, model: str) -> str: ...
    def capabilities(self, model: str) -> Capabilities: ...  # what the model map says


class TokenCounting(Protocol):
    def counter(self, model: str) -> Callable[[str], int]:
        """A function counting the tokens of a text for `model` (approximate for some)."""
        ...


class Source(Protocol):
    """A Kafka topic read in batches: chat.control is only this."""

    async def poll(self, max_records: int, timeout_s: float) -> list[Delivery]: ...
    async def close(self) -> None: ...


class RequestSource(Source, Protocol):
    """chat.request: a consumer group member that commits, pauses and rewinds."""

    async def commit(self, offsets: Mapping[Partition, int], *, wait: bool = True) -> None: ...
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def seek(self, deliveries: Iterable[Delivery]) -> None: ...


class DeadLetters(Protocol):
    async def send(self, topic: str, value: bytes | None, *, key: bytes | None = None,
                   headers: Iterable[tuple[str, bytes]] = (), timeout_s: float = 30.0) -> None: ...


class Embedder(Protocol):
    """Texts -> L2-normalised vectors, one row each. Blocking: call it from a thread."""

    def embed(self, texts: list[str]) -> np.ndarray[Any, Any]: ...


class DocumentIndex(Protocol):
    """The searches the retriever makes. Blocking: call them from a thread."""

    def exists(self, collection: str, /) -> bool: ...
    def vector_search_many(self, collection: str, vectors: list[np.ndarray[Any, Any]], k: int,
                           where: dict[str, Any] | None, /) -> list[list[Hit]]: ...
    def keyword_search(self, collection: str, query: str, k: int,
                       where: dict[str, Any] | None, /) -> list[Hit]: ...
    def embeddings(self, collection: str, vector_ids: list[str], /
                   ) -> dict[str, np.ndarray[Any, Any]]:
        ...


class Telemetry(Protocol):
    """Traces and GenAI metrics (OpenTelemetry). `enabled` False: nothing is recorded."""

    @property
    def enabled(self) -> bool: ...
    @property
    def capture_content(self) -> bool:
        """May the model-call span hold the prompt and the answer?"""
        ...
    def job_ended(self, record: JobTelemetry) -> None:
        """Make the job's spans and metrics from its record (never blocks, never raises
        for the job: an exporter's trouble is its own)."""
        ...
    def sending(self, topic: str, incoming: str | None) -> AbstractContextManager[str | None]:
        """Around putting one request on `topic` (the gateway): yields the traceparent the
        message carries, continuing the client's `incoming` one."""
        ...
    def close(self) -> None: ...
