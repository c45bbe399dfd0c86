"""What the actors need from the world, as Protocols. Adapters implement them;
unit tests implement small fakes of them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import trio

from actors.adapters.postgres import ClaimResult, Hold, Refused
from actors.adapters.redis_events import StreamEntry
from messages.mailboxes import Delivery, JobFinished, JobRejected, ProviderChunk

Partition = tuple[str, int]


class EventWriter(Protocol):
    async def write(self, entries: Sequence[StreamEntry]) -> None: ...
    async def done_recorded(self, job_id: str) -> bool: ...
    async def last_seq(self, job_id: str, attempt: int) -> int: ...


class RecordWriter(Protocol):
    async def write_records(self, records: Sequence[JobFinished | JobRejected],
                            owner: str) -> None: ...


class JobStore(Protocol):
    async def claim(self, *, job_id: str, user_id: str, session_id: str, trace_id: str,
                    mode: str, model: str, provider: str, owner: str,
                    lease_s: float, history_limit: int = 0) -> ClaimResult: ...
    async def renew_leases(self, *, job_ids: Sequence[str], owner: str,
                           lease_s: float) -> set[str]: ...
    async def release_lease(self, *, job_id: str, owner: str) -> None: ...
    async def reserve(self, *, job_id: str, owner: str, holds: Sequence[Hold],
                      period: str) -> Refused | None: ...


class ChatModel(Protocol):
    async def stream(self, *, model: str, api_base: str | None, api_key_env: str | None,
                     messages: list[dict[str, str]], params: Mapping[str, Any],
                     out: trio.MemorySendChannel[ProviderChunk],
                     stream_path: str = "auto") -> None: ...


class RequestSource(Protocol):
    async def poll(self, max_records: int, timeout_s: float) -> list[Delivery]: ...
    async def commit(self, offsets: Mapping[Partition, int]) -> None: ...
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def seek(self, deliveries: Iterable[Delivery]) -> None: ...
    async def close(self) -> None: ...


class DeadLetters(Protocol):
    async def send(self, topic: str, value: bytes | None, *, key: bytes | None = None,
                   headers: Iterable[tuple[str, bytes]] = (), timeout_s: float = 30.0) -> None: ...
