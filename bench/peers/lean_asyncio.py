"""The lean peer: what a strong engineer would build today with asyncio, for the benchmark.

Same wire contract as chat-actors and the seed-style peer (contract 1.1, 1.2, 1.4, 1.5):
`chat.request` in, one Redis stream `sse:chat:{job_id}` of started / token* / final|error / done
out, `llm_jobs` and `llm_messages` rows in Postgres. Each choice is the fast, ordinary one:

- uvloop, one task per request, bounded by a semaphore (max in flight).
- The model: one aiohttp `ClientSession` (HTTP/1.1 keep-alive, no cap on connections) POSTing
  `/chat/completions` with `stream: true` and `include_usage`; the SSE is split on newlines by
  hand and each `data:` chunk decoded by a typed msgspec decoder. No SDK in between. aiohttp
  parses HTTP in C (llhttp); `--http httpx` swaps in one `httpx.AsyncClient`, whose pure-Python
  h11 parse of every chunk costs about 3x the CPU per token on the benchmark (README.md).
- Redis: one flusher task writes every pending event of every job in ONE non-transactional
  pipeline (XADD MAXLEN ~, and EXPIRE after `done`, as chat-actors writes), at most every 2 ms;
  a job's tokens pending between two flushes become one `token` event. `seq` is given at flush
  time, so it still counts up from 0 without gaps. A failed pipeline is retried whole (an entry
  may then be written twice; chat-actors' append-once script is the thing this peer skips).
- Postgres: psycopg 3 async connections. The claim is chat-actors' lease claim (same statement)
  plus the history read on the same pooled connection; terminal rows (both messages and the
  job's final status, under the lease) are written by one writer task in batches, one
  transaction each, with executemany. Leases of running jobs are renewed by one UPDATE a period.
- Kafka: confluent-kafka polled in a worker thread; offsets are committed (asynchronously, per
  poll) up to the last contiguous offset whose job's terminal writes landed: Postgres, then
  `done`, then the commit, the order chat-actors keeps. A cancel consumer like seed-style's.
- Left out on purpose, as in the seed-style peer: DLQ, retries and fallbacks between vendors,
  cancel tombstones (a cancel that arrives before its job's claim does count), RAG ("rag"
  requests get `error{rag_unavailable}` + `done{failed}`). A cancelled job ends like the
  seed-style peer's: `done{cancelled}` with no `error` event.

    python -m bench.peers.lean_asyncio --kafka 127.0.0.1:9092 --redis redis://127.0.0.1:6379/0 \
        --postgres postgresql://postgres@127.0.0.1:5432/postgres \
        --llm-url http://127.0.0.1:8088/v1 --model smollm2 --health-port 9465

`GET /readyz` answers 503 until Redis and Postgres answered a ping, the control consumer holds
its partitions and the request consumer is subscribed (the point chat-actors reports ready).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Annotated, Any, LiteralString

import aiohttp
import confluent_kafka
import httpx
import msgspec
import psycopg
import redis.asyncio as aioredis
import uvloop
from confluent_kafka import TopicPartition

from bench.peers.common import (
    assign_at_end,
    ensure_topics,
    peer_arguments,
    poll_records,
    serve_health,
)

log = logging.getLogger("lean_asyncio")

SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."  # chat-actors' default prompt
HISTORY_ROWS = 50  # chat-actors' llm.max_history_turns
STREAM_MAXLEN = 10_000  # chat-actors' stream.maxlen
STREAM_TTL_S = 3600
LEASE_S = 30.0  # chat-actors' jobs.lease_s
FLUSH_EVERY_S = 0.002
WRITE_BATCH = 500
SHUTDOWN_GRACE_S = 10.0
HTTP_KEEPALIVE = 100  # httpcore's idle scan is O(idle x all) per request: see seed_style.py
MAX_SSE_LINE = 1 << 20

# chat-actors' lease claim (actors/adapters/postgres.py, _CLAIM_MANY) for one job, with the
# history read on the same connection after it, as chat-actors reads it.
CLAIM = """
INSERT INTO llm_jobs AS j (job_id, user_id, session_id, trace_id, mode, model,
    provider, status, attempt, lease_owner, lease_until, started_at)
VALUES (%(job_id)s, %(user_id)s, %(session_id)s, %(trace_id)s, %(mode)s,
    %(model)s, %(provider)s, 'running', 1, %(holder)s, now() + %(lease)s, now())
ON CONFLICT (job_id) DO UPDATE SET
    attempt = j.attempt + 1, status = 'running', lease_owner = excluded.lease_owner,
    lease_until = excluded.lease_until, started_at = now(),
    model = excluded.model, provider = excluded.provider,
    user_id = excluded.user_id, session_id = excluded.session_id,
    trace_id = excluded.trace_id, mode = excluded.mode,
    error = NULL, finished_at = NULL
WHERE (j.status IN ('queued', 'running') AND j.user_id = excluded.user_id
       AND (j.lease_until IS NULL OR j.lease_until < now()))
   OR j.status = 'rejected'
RETURNING attempt, (SELECT status FROM llm_jobs WHERE job_id = %(job_id)s)
"""
HISTORY = """
SELECT role, content, tool_calls, tool_call_id, thinking_blocks, attachments
FROM llm_messages WHERE user_id = %s AND session_id = %s AND job_id <> %s
ORDER BY id DESC LIMIT %s
"""
RENEW = """
UPDATE llm_jobs SET lease_until = now() + %s
WHERE job_id = ANY(%s) AND lease_owner = %s AND status = 'running'
RETURNING job_id
"""
FINISH = """
UPDATE llm_jobs SET status = %s, prompt_tokens = %s, completion_tokens = %s, cost_usd = 0,
    ttft_ms = %s, latency_ms = %s, error = %s, partial = %s, finished_at = now(),
    lease_until = NULL
WHERE job_id = %s AND lease_owner = %s AND attempt = %s
RETURNING job_id
"""
INSERT_MESSAGE = """
INSERT INTO llm_messages (job_id, session_id, user_id, role, content, tokens, partial)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (job_id, role, (coalesce(tool_call_id, ''))) DO NOTHING
"""

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class Params(msgspec.Struct, rename="camel"):
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None


class ChatRequest(msgspec.Struct, rename="camel"):
    job_id: NonEmpty
    user_id: NonEmpty
    session_id: NonEmpty
    message: NonEmpty
    mode: str = "gen"
    params: Params = msgspec.field(default_factory=Params)
    timeout_s: float | None = None
    trace_id: str | None = None


class Cancel(msgspec.Struct, rename="camel"):
    type: str
    job_id: str = ""
    user_id: str = ""


class Delta(msgspec.Struct):
    content: str | None = None


class Choice(msgspec.Struct):
    delta: Delta = msgspec.field(default_factory=Delta)
    finish_reason: str | None = None


class VendorUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Chunk(msgspec.Struct):
    choices: list[Choice] = []
    usage: VendorUsage | None = None


request_decoder = msgspec.json.Decoder(ChatRequest)
cancel_decoder = msgspec.json.Decoder(Cancel)
chunk_decoder = msgspec.json.Decoder(Chunk)
encoder = msgspec.json.Encoder()


class ProviderError(Exception):
    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- Redis: one pipeline per flush, for every job ------------------------------------------

class JobStream:
    """One job's stream: events waiting for the next flush, in order; tokens coalesced."""

    __slots__ = ("ids", "key", "pending", "seq")

    def __init__(self, job_id: str, user_id: str, session_id: str, attempt: int) -> None:
        self.key = f"sse:chat:{job_id}"
        self.ids = {"jobId": job_id, "userId": user_id, "sessionId": session_id,
                    "attempt": attempt}
        self.seq = 0
        # [event, data bytes | token texts, ts, future to resolve once written]
        self.pending: list[list[Any]] = []


class EventLog:
    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._dirty: dict[JobStream, None] = {}  # an ordered set
        self._wake = asyncio.Event()
        self._closing = False

    def emit(self, stream: JobStream, event: str, data: dict[str, Any],
             written: asyncio.Future[None] | None = None) -> None:
        stream.pending.append([event, encoder.encode(data), now_ms(), written])
        self._dirty[stream] = None
        self._wake.set()

    def token(self, stream: JobStream, text: str) -> None:
        pending = stream.pending
        if pending and pending[-1][0] == "token":
            pending[-1][1].append(text)
        else:
            pending.append(["token", [text], now_ms(), None])
            self._dirty[stream] = None
            self._wake.set()

    async def emit_and_wait(self, stream: JobStream, event: str, data: dict[str, Any]) -> None:
        written = asyncio.get_running_loop().create_future()
        self.emit(stream, event, data, written)
        await written

    async def run(self) -> None:
        """Flush at once when idle, then at most every FLUSH_EVERY_S while events keep coming."""
        while not (self._closing and not self._dirty):
            await self._wake.wait()
            self._wake.clear()
            batch, self._dirty = self._dirty, {}
            entries: list[tuple[str, dict[Any, Any], bool]] = []
            written: list[asyncio.Future[None]] = []
            for stream in batch:
                for event, data, ts, future in stream.pending:
                    if event == "token":
                        data = encoder.encode({"text": "".join(data)})
                    entries.append((stream.key, {"event": event, **stream.ids, "seq": stream.seq,
                                                 "ts": ts, "data": data}, event == "done"))
                    stream.seq += 1
                    if future is not None:
                        written.append(future)
                stream.pending = []
            if entries:
                await self._write(entries)
            for future in written:
                if not future.done():
                    future.set_result(None)
            if not self._closing:
                await asyncio.sleep(FLUSH_EVERY_S)

    async def _write(self, entries: list[tuple[str, dict[Any, Any], bool]]) -> None:
        backoff = 0.05
        while True:
            pipe = self._client.pipeline(transaction=False)
            for key, fields, done in entries:
                pipe.xadd(key, fields, maxlen=STREAM_MAXLEN, approximate=True)
                if done:
                    pipe.expire(key, STREAM_TTL_S)
            try:
                await pipe.execute()
            except aioredis.RedisError as exc:  # Redis away: keep the batch, try again
                log.warning("redis: %s: %s; retrying %d entries", type(exc).__name__, exc,
                            len(entries))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            else:
                return

    def close(self) -> None:
        self._closing = True
        self._wake.set()


# --- Postgres: pooled claims, one batching writer ------------------------------------------

class PgPool:
    """A few autocommit AsyncConnections in a queue (psycopg_pool is not installed)."""

    def __init__(self, dsn: str, size: int) -> None:
        self._dsn = dsn
        self._size = size
        self._idle: asyncio.Queue[psycopg.AsyncConnection[Any] | None] = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self._size):
            self._idle.put_nowait(await psycopg.AsyncConnection.connect(self._dsn, autocommit=True))

    async def fetch(self, statements: list[tuple[LiteralString, Any]]) -> list[list[tuple[Any, ...]]]:
        """Run the statements on one connection; stop after the first that returns no row."""
        conn = await self._idle.get()
        results: list[list[tuple[Any, ...]]] = []
        try:
            if conn is None or conn.closed:  # Postgres restarted under us: reconnect, lazily
                conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
            for query, params in statements:
                rows = await (await conn.execute(query, params)).fetchall()
                results.append(rows)
                if not rows:
                    break
            return results
        finally:
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        while not self._idle.empty():
            conn = self._idle.get_nowait()
            if conn is not None:
                await conn.close()


class Finished(msgspec.Struct):
    job_id: str
    user_id: str
    session_id: str
    attempt: int
    status: str
    user_message: str | None
    answer: str
    partial: bool
    prompt_tokens: int | None
    completion_tokens: int
    ttft_ms: int | None
    latency_ms: int
    error: str | None


class RecordWriter:
    """Terminal rows of every job that ended since the last batch, one transaction each."""

    def __init__(self, dsn: str, lease_owner: str) -> None:
        self._dsn = dsn
        self._lease_owner = lease_owner
        self._queue: asyncio.Queue[tuple[Finished, asyncio.Future[bool]]] = asyncio.Queue()
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def write(self, record: Finished) -> bool:
        """True once the rows landed; False when another worker took the lease over."""
        landed = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((record, landed))
        return await landed

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < WRITE_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write_batch(batch)

    async def _write_batch(self, batch: list[tuple[Finished, asyncio.Future[bool]]]) -> None:
        backoff = 0.05
        while True:
            try:
                landed = await self._write([record for record, _ in batch])
                break
            except psycopg.OperationalError as exc:  # the connection: reconnect, retry
                log.warning("postgres: %s; retrying %d records", exc, len(batch))
                if self._conn is not None:
                    await self._conn.close()
                self._conn = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            except psycopg.Error as exc:  # a record refused: fail only its own job
                if len(batch) > 1:
                    for item in batch:
                        await self._write_batch([item])
                elif not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                return
        for record, future in batch:
            if not future.done():
                future.set_result(record.job_id in landed)

    async def _write(self, records: list[Finished]) -> set[str]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        landed: set[str] = set()
        async with self._conn.transaction(), self._conn.cursor() as cur:
            await cur.executemany(FINISH, [(
                r.status, r.prompt_tokens, r.completion_tokens, r.ttft_ms, r.latency_ms, r.error,
                r.partial, r.job_id, self._lease_owner, r.attempt) for r in records],
                returning=True)
            while True:
                landed.update(row[0] for row in await cur.fetchall())
                if not cur.nextset():
                    break
            messages: list[tuple[Any, ...]] = []
            for r in records:
                if r.job_id not in landed:
                    continue
                ids = (r.job_id, r.session_id, r.user_id)
                if r.user_message is not None:
                    messages.append((*ids, "user", r.user_message, None, False))
                if r.answer:
                    messages.append((*ids, "assistant", r.answer, r.completion_tokens, r.partial))
            if messages:
                await cur.executemany(INSERT_MESSAGE, messages)
        return landed

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


# --- the worker -----------------------------------------------------------------------------

class Offsets:
    """Per partition, the offsets taken in order; commit up to the first not yet settled."""

    def __init__(self, topic: str) -> None:
        self._topic = topic
        self._taken: dict[int, deque[int]] = {}
        self._settled: dict[int, set[int]] = {}

    def take(self, partition: int, offset: int) -> None:
        self._taken.setdefault(partition, deque()).append(offset)
        self._settled.setdefault(partition, set())

    def settle(self, partition: int, offset: int) -> None:
        self._settled[partition].add(offset)

    def committable(self) -> list[TopicPartition]:
        commits = []
        for partition, taken in self._taken.items():
            settled, last = self._settled[partition], None
            while taken and taken[0] in settled:
                last = taken.popleft()
                settled.discard(last)
            if last is not None:
                commits.append(TopicPartition(self._topic, partition, last + 1))
        return commits


class Job:
    __slots__ = ("cancel_asked", "claimed", "task", "user_id")

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.claimed = False
        self.cancel_asked = False
        self.task: asyncio.Task[None] | None = None


class Answer:
    __slots__ = ("finish_reason", "first_token_at", "parts", "usage")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finish_reason = "stop"
        self.usage: VendorUsage | None = None
        self.first_token_at: float | None = None


class Worker:
    def __init__(self, *, args: argparse.Namespace, events: EventLog, pool: PgPool,
                 writer: RecordWriter, http: aiohttp.ClientSession | httpx.AsyncClient,
                 lease_owner: str) -> None:
        self.events, self.pool, self.writer, self.http = events, pool, writer, http
        self.model, self.lease_owner = args.model, lease_owner
        self.max_tokens, self.timeout_s = args.max_tokens, args.timeout_s
        self.chat_url = args.llm_url.rstrip("/") + "/chat/completions"
        self.offsets = Offsets(args.request_topic)
        self._slots = asyncio.Semaphore(args.max_in_flight)
        self.jobs: dict[str, Job] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    async def admit(self, partition: int, offset: int, value: bytes | None) -> None:
        self.offsets.take(partition, offset)
        try:
            request = request_decoder.decode(value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("skipping a bad request: %r", (value or b"")[:200])
            self.offsets.settle(partition, offset)
            return
        if request.job_id in self.jobs:
            log.warning("job %s is already running here; duplicate skipped", request.job_id)
            self.offsets.settle(partition, offset)
            return
        await self._slots.acquire()  # at max_in_flight the poll loop waits here
        if self.closed:
            self._slots.release()
            return
        job = self.jobs[request.job_id] = Job(request.user_id)
        job.task = task = asyncio.create_task(self.run_job(request, job, partition, offset))
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._ended(request.job_id, t))

    def _ended(self, job_id: str, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        job = self.jobs.get(job_id)
        if job is not None and job.task is task:
            del self.jobs[job_id]
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("job %s crashed", job_id, exc_info=task.exception())

    def cancel(self, job_id: str, user_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            log.info("cancel for %s: not running here", job_id)
        elif job.user_id != user_id:
            log.warning("cancel for %s from %s, who does not own it: ignored", job_id, user_id)
        elif not job.claimed:
            job.cancel_asked = True  # applied right after the claim
        elif job.task is not None:
            job.task.cancel("cancelled by its owner")

    async def run_job(self, request: ChatRequest, job: Job, partition: int, offset: int) -> None:
        try:
            rows = await self.pool.fetch([
                (CLAIM, {"job_id": request.job_id, "user_id": request.user_id,
                         "session_id": request.session_id,
                         "trace_id": request.trace_id or uuid.uuid4().hex, "mode": request.mode,
                         "model": self.model, "provider": "openai", "holder": self.lease_owner,
                         "lease": timedelta(seconds=LEASE_S)}),
                (HISTORY, (request.user_id, request.session_id, request.job_id, HISTORY_ROWS))])
        except psycopg.Error as exc:  # the offset stays open: the job comes back after a restart
            log.error("job %s: claim failed (%s: %s)", request.job_id, type(exc).__name__, exc)
            return
        if not rows[0]:
            log.info("job %s is finished, leased elsewhere or another user's: not run",
                     request.job_id)
            self.offsets.settle(partition, offset)
            return
        stream = JobStream(request.job_id, request.user_id, request.session_id, rows[0][0][0])
        history = [{"role": role, "content": content} for role, content, *_ in reversed(rows[1])
                   if role in ("user", "assistant")]
        job.claimed = True
        self.events.emit(stream, "started", {"model": self.model, "mode": request.mode,
                                             "attempt": rows[0][0][0]})
        answer, began = Answer(), time.monotonic()
        status, error = "completed", None
        timeout_s = min(self.timeout_s, request.timeout_s or self.timeout_s)
        try:
            if job.cancel_asked:
                status = "cancelled"
            elif request.mode == "rag":
                status = "failed"
                error = {"code": "rag_unavailable", "retryable": False,
                         "message": "RAG is not available on this worker"}
            else:
                async with asyncio.timeout(timeout_s):
                    await self._stream(request, history, stream, answer)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # handled: later awaits in this task are not cancelled
            status = "cancelled"  # the owner's cancel, or SIGTERM
        except TimeoutError:
            status = "timeout"
            error = {"code": "timeout", "retryable": True,
                     "message": f"the job took longer than its {timeout_s:g} s timeout"}
        except (aiohttp.ClientError, httpx.HTTPError, ProviderError, msgspec.DecodeError) as exc:
            status = "failed"
            error = {"code": "provider_unavailable", "message": f"{type(exc).__name__}: {exc}",
                     "retryable": getattr(exc, "retryable", True)}
        except Exception as exc:  # a bug or a malformed field: this job fails, not the worker
            log.exception("job %s failed", request.job_id)
            status = "failed"
            error = {"code": "internal", "message": f"{type(exc).__name__}: {exc}",
                     "retryable": False}
        # From here on a late cancel finds the job gone and cannot cut its records short.
        if self.jobs.get(request.job_id) is job:
            del self.jobs[request.job_id]
        if await self._finish(stream, request, answer, status, error, began):
            self.offsets.settle(partition, offset)

    async def _stream(self, request: ChatRequest, history: list[dict[str, str]],
                      stream: JobStream, answer: Answer) -> None:
        params = request.params
        body: dict[str, Any] = {
            "model": self.model, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens or self.max_tokens,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, *history,
                         {"role": "user", "content": request.message}]}
        for name, value in (("temperature", params.temperature), ("top_p", params.top_p),
                            ("stop", params.stop)):
            if value is not None:
                body[name] = value
        async with self._post(encoder.encode(body)) as (status, chunks):
            if status >= 400:
                detail = (await anext(chunks, b""))[:300].decode(errors="replace")
                raise ProviderError(f"HTTP {status}: {detail}",
                                    retryable=status in (408, 429) or status >= 500)
            rest = b""
            async for data in chunks:
                *lines, rest = (rest + data).split(b"\n")
                if len(rest) > MAX_SSE_LINE:
                    raise ProviderError("an SSE line longer than 1 MiB", retryable=False)
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        return
                    chunk = chunk_decoder.decode(payload)
                    for choice in chunk.choices:
                        text = choice.delta.content
                        if text:
                            if answer.first_token_at is None:
                                answer.first_token_at = time.monotonic()
                            answer.parts.append(text)
                            self.events.token(stream, text)
                        if choice.finish_reason:
                            answer.finish_reason = choice.finish_reason
                    if chunk.usage is not None:
                        answer.usage = chunk.usage
        raise ProviderError("the stream ended before [DONE]", retryable=True)

    @contextlib.asynccontextmanager
    async def _post(self, body: bytes) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
        """POST to the vendor: its status and its body's bytes as they arrive."""
        if isinstance(self.http, aiohttp.ClientSession):
            async with self.http.post(self.chat_url, data=body) as reply:
                yield reply.status, reply.content.iter_any()
        else:
            async with self.http.stream("POST", self.chat_url, content=body) as reply:
                yield reply.status_code, reply.aiter_raw()

    async def _finish(self, stream: JobStream, request: ChatRequest, answer: Answer,
                      status: str, error: dict[str, Any] | None, began: float) -> bool:
        """Final or error, the terminal rows, then done: True once all of it landed."""
        text = "".join(answer.parts).replace("\x00", "")  # Postgres cannot store U+0000
        partial = status != "completed" and bool(text)
        usage = answer.usage
        prompt_tokens = usage.prompt_tokens if usage is not None else None
        completion_tokens = usage.completion_tokens if usage is not None else len(answer.parts)
        if status == "completed":
            self.events.emit(stream, "final", {
                "text": text, "finishReason": answer.finish_reason,
                "usage": {"promptTokens": prompt_tokens or 0,
                          "completionTokens": completion_tokens,
                          "totalTokens": (prompt_tokens or 0) + completion_tokens},
                "costUsd": 0.0, "model": self.model, "provider": "openai"})
        elif error is not None:
            self.events.emit(stream, "error", error)
        first = answer.first_token_at
        try:
            landed = await self.writer.write(Finished(
                job_id=request.job_id, user_id=request.user_id, session_id=request.session_id,
                attempt=int(stream.ids["attempt"]), status=status,
                user_message=None if request.mode == "rag" else request.message.replace("\x00", ""),
                answer=text, partial=partial, prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                ttft_ms=None if first is None else round((first - began) * 1000),
                latency_ms=round((time.monotonic() - began) * 1000),
                error=None if error is None else f"{error['code']}: {error['message']}"))
        except psycopg.Error as exc:  # refused for good: redelivery would fail the same way
            log.error("job %s: terminal rows refused (%s: %s)", request.job_id,
                      type(exc).__name__, exc)
            return True
        if not landed:
            log.warning("job %s: its lease was taken over; no done from here", request.job_id)
            return True
        await self.events.emit_and_wait(stream, "done", {"status": status, "partial": partial})
        return True

    async def renew_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            running = [job_id for job_id, job in self.jobs.items() if job.claimed]
            if running:
                try:
                    await self.pool.fetch([(RENEW, (
                        timedelta(seconds=LEASE_S), running, self.lease_owner))])
                except psycopg.Error as exc:
                    log.warning("lease renewal failed (%s); trying again next period", exc)

    async def drain(self) -> None:
        self.closed = True
        for job in list(self.jobs.values()):
            job.cancel_asked = True  # one still claiming ends right after its claim
            if job.claimed and job.task is not None:
                job.task.cancel("the worker is shutting down")
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=SHUTDOWN_GRACE_S)


# --- Kafka (blocking calls, each consumer in its own thread) and /readyz, as seed-style ------
# Copied, not imported: importing seed_style would load LangChain into this process.

def poll_batch(consumer: confluent_kafka.Consumer,
               commits: list[TopicPartition]) -> list[tuple[int, int, bytes | None]]:
    if commits:
        consumer.commit(offsets=commits, asynchronous=True)
    return [(record.partition() or 0, record.offset() or 0, record.value())
            for record in poll_records(consumer)]


async def main(args: argparse.Namespace) -> None:
    stopping, ready = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    health = await serve_health(args.health_port, ready)
    lease_owner = f"lean-{socket.gethostname()}-{os.getpid()}"
    client = aioredis.Redis.from_url(args.redis)
    await client.ping()
    pool = PgPool(args.postgres, args.pool_size)
    await pool.open()
    await pool.fetch([("SELECT 1", ())])
    headers = {"authorization": f"Bearer {os.environ.get('LOCAL_LLM_API_KEY') or 'not-needed'}",
               "content-type": "application/json", "accept-encoding": "identity"}
    # No cap on connections, keep-alive on; the job's own deadline bounds the whole call.
    http: aiohttp.ClientSession | httpx.AsyncClient = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), headers=headers,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0)) if args.http == "aiohttp" \
        else httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(args.timeout_s, connect=5.0),
                               limits=httpx.Limits(max_connections=None,
                                                   max_keepalive_connections=HTTP_KEEPALIVE))
    events, writer = EventLog(client), RecordWriter(args.postgres, lease_owner)
    worker = Worker(args=args, events=events, pool=pool, writer=writer, http=http,
                    lease_owner=lease_owner)
    settings = {"bootstrap.servers": args.kafka, "fetch.wait.max.ms": 10,
                "session.timeout.ms": 6000, "log.connection.close": False}
    requests = confluent_kafka.Consumer({**settings, "group.id": args.group,
                                         "enable.auto.commit": False,
                                         "auto.offset.reset": "earliest"})
    control = confluent_kafka.Consumer({**settings, "enable.auto.commit": False,
                                        "group.id": f"{args.group}.control.{uuid.uuid4().hex[:8]}"})
    request_thread, control_thread = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    flusher = asyncio.create_task(events.run())
    helpers = [asyncio.create_task(writer.run()), asyncio.create_task(worker.renew_leases())]
    try:
        await asyncio.to_thread(ensure_topics, args.kafka, [args.request_topic, args.control_topic])
        await loop.run_in_executor(control_thread, assign_at_end, control, args.control_topic)
        await loop.run_in_executor(request_thread, requests.subscribe, [args.request_topic])
        ready.set()
        log.warning("lean peer ready: %s -> sse:chat:{job_id}", args.request_topic)

        async def take_requests() -> None:
            while not stopping.is_set():
                for partition, offset, value in await loop.run_in_executor(
                        request_thread, poll_batch, requests, worker.offsets.committable()):
                    await worker.admit(partition, offset, value)

        async def take_cancels() -> None:
            while not stopping.is_set():
                for _, _, value in await loop.run_in_executor(control_thread, poll_batch,
                                                              control, []):
                    try:
                        cancel = cancel_decoder.decode(value or b"")
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        log.warning("skipping a bad control message: %r", (value or b"")[:200])
                        continue
                    if cancel.type == "cancel":
                        worker.cancel(cancel.job_id, cancel.user_id)

        loops = [asyncio.create_task(take_requests()), asyncio.create_task(take_cancels())]
        stop_wait = asyncio.create_task(stopping.wait())
        # A loop that dies (the broker refused us, a bug in a helper) stops the worker too.
        await asyncio.wait([*loops, *helpers, flusher, stop_wait],
                           return_when=asyncio.FIRST_COMPLETED)
        stopping.set()
        await worker.drain()  # before joining the loops: admit() may wait for a free slot
        await asyncio.wait(loops)  # each ends within one poll
        events.close()
        await asyncio.wait([flusher], timeout=SHUTDOWN_GRACE_S)
        final = worker.offsets.committable()
        if final:
            await loop.run_in_executor(request_thread, lambda: requests.commit(
                offsets=final, asynchronous=False))
        for task in [*loops, *helpers, flusher]:
            if task.done():
                task.result()
    finally:
        ready.clear()
        for task in [*helpers, flusher]:
            task.cancel()
        await loop.run_in_executor(request_thread, requests.close)
        await loop.run_in_executor(control_thread, control.close)
        request_thread.shutdown()
        control_thread.shutdown()
        await writer.close()
        await pool.close()
        await client.aclose()
        await (http.close() if isinstance(http, aiohttp.ClientSession) else http.aclose())
        health.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = peer_arguments("python -m bench.peers.lean_asyncio", __doc__, "chat-lean")
    parser.add_argument("--http", choices=("aiohttp", "httpx"), default="aiohttp",
                        help="the model's HTTP client (httpx: ~3x the CPU per token, see README)")
    return parser.parse_args(argv)

if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=arguments.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(main(arguments))
