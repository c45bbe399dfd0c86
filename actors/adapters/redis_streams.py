"""The gateway's side of Redis: reading job streams, owner and idempotency keys.

A `BlockingReader` holds one connection and waits in XREAD BLOCK on many streams at
once (one round trip for every client it serves); `unblock` wakes it from another
connection (CLIENT UNBLOCK) when the set of streams changes. Everything else is
request/reply on a small pool, each call in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
import trio

from actors.adapters.redis_events import translate
from config import secret

T = TypeVar("T")
Entry = tuple[str, dict[str, str]]  # (entry id, fields)


def _client(url: str, password_env: str, socket_timeout_s: float | None) -> Any:
    return redis.Redis.from_url(url, password=secret(password_env) or None,
                                socket_timeout=socket_timeout_s, socket_connect_timeout=5.0,
                                decode_responses=True)


class StreamReads:
    """Request/reply reads and the gateway's own keys (owner of a job, idempotency)."""

    def __init__(self, *, url: str, password_env: str, socket_timeout_s: float = 10.0) -> None:
        self._url, self._password_env = url, password_env
        self._client = _client(url, password_env, socket_timeout_s)
        self._limiter = trio.CapacityLimiter(8)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except redis.RedisError as exc:
            raise translate(exc) from exc

    def reader(self) -> BlockingReader:
        return BlockingReader(_client(self._url, self._password_env, None), self._client)

    async def ping(self) -> None:
        await self._run(self._client.ping)

    async def remember_owner(self, key: str, user_id: str, ttl_s: int) -> None:
        await self._run(lambda: self._client.set(key, user_id, ex=ttl_s))

    async def owner_key(self, key: str) -> str | None:
        return await self._run(self._client.get, key)

    async def first_user(self, stream: str, job_id: str) -> str | None:
        """The userId of the job's first entry in `stream` (None: nothing yet)."""
        def first() -> str | None:
            for _, fields in self._client.xrange(stream, "-", "+", count=64):
                if fields.get("jobId") == job_id:
                    return fields.get("userId")
            return None
        return await self._run(first)

    async def claim_once(self, key: str, value: str, ttl_s: int) -> str:
        """Set `key` to `value` unless it holds one already; return what it holds."""
        def claim() -> str:
            pipe = self._client.pipeline()
            pipe.set(key, value, nx=True, ex=ttl_s)
            pipe.get(key)
            return pipe.execute()[1]
        return await self._run(claim)

    async def after(self, stream: str, after_id: str, count: int) -> list[Entry]:
        return await self._run(lambda: self._client.xrange(stream, f"({after_id}", "+",
                                                          count=count))

    async def last(self, stream: str) -> Entry | None:
        entries = await self._run(lambda: self._client.xrevrange(stream, "+", "-", count=1))
        return entries[0] if entries else None

    def close(self) -> None:
        self._client.close()


class BlockingReader:
    """One connection blocked in XREAD on many streams; `unblock` wakes it."""

    def __init__(self, client: Any, control: Any) -> None:
        self._client = client
        self._control = control
        self._id: int | None = None

    def read(self, streams: Mapping[str, str], count: int, block_ms: int) -> list[tuple[str, list[Entry]]]:
        """Blocking (run it in a thread): entries after each stream's id, or [] on timeout."""
        try:
            if self._id is None:
                self._id = int(self._client.client_id())
            return self._client.xread(dict(streams), count=count, block=block_ms) or []
        except redis.RedisError as exc:
            self._id = None
            raise translate(exc) from exc

    def unblock(self) -> None:
        """Wake a blocked `read` (it returns [] at once); nothing if none is blocked."""
        if self._id is not None:
            try:
                self._control.client_unblock(self._id)
            except redis.RedisError:
                pass  # the read times out on its own instead

    def close(self) -> None:
        self._client.close()
