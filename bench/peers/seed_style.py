"""The seed-style peer: the older worker design chat-actors replaces, kept working for the benchmark.

It does the same job on the same wire contract (contract 2.1, 1.2, 1.4, 1.5): `chat.request` in,
one Redis stream `sse:chat:{job_id}` of started / token* / final|error / done out, `llm_jobs` and
`llm_messages` rows in Postgres. What makes it "seed style" is how, and each choice is the one
the old design made, written competently rather than slowed down:

- One asyncio process (`asyncio.run`), one task per request, bounded by a semaphore. No actors,
  no mailboxes: every write is awaited in-line by the job that makes it.
- The model is LangChain's `ChatOpenAI(streaming=True)` driven by `ainvoke` with an
  `AsyncCallbackHandler`; its `on_llm_new_token` does one awaited `XADD` through `redis.asyncio`
  per token. This per-token round trip (no pipelining, no coalescing) is the defining trait.
- Postgres through psycopg 3 async connections in autocommit, one statement (= one transaction)
  per write: running row, user message, assistant message, final status. No batching.
- confluent-kafka polled in a worker thread, offsets auto-committed on a timer (at-most-once
  around a crash, which the old design accepted); no leases, no DLQ, no retries or fallbacks,
  no cancel tombstones, no RAG ("rag" requests get `error{rag_unavailable}` + `done{failed}`).
- Cancels: a second consumer assigned to every `chat.control` partition from its current end;
  a cancel whose userId owns a running job cancels that job's task.

    python -m bench.peers.seed_style --kafka 127.0.0.1:9092 --redis redis://127.0.0.1:6379/0 \
        --postgres postgresql://postgres@127.0.0.1:5432/postgres \
        --llm-url http://127.0.0.1:8088/v1 --model smollm2 --health-port 9465

`GET /readyz` answers 503 until Redis and Postgres answered a ping, the control consumer holds
its partitions and the request consumer is subscribed (the same point chat-actors reports ready).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import confluent_kafka
import httpx2
import openai
import psycopg
import redis.asyncio as aioredis
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from bench.peers.common import (
    assign_at_end,
    ensure_topics,
    peer_arguments,
    poll_records,
    serve_health,
)

log = logging.getLogger("seed_style")

SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."  # chat-actors' default prompt
HISTORY_ROWS = 20
STREAM_TTL_S = 3600
SHUTDOWN_GRACE_S = 10.0
HTTP_KEEPALIVE = 100

UPSERT_RUNNING = """
INSERT INTO llm_jobs (job_id, user_id, session_id, trace_id, mode, model, provider, status,
                      attempt, started_at)
VALUES (%s, %s, %s, %s, %s, %s, 'openai', 'running', 1, now())
ON CONFLICT (job_id) DO UPDATE SET status = 'running', attempt = 1, started_at = now(),
    finished_at = NULL
"""
SELECT_HISTORY = """
SELECT role, content FROM llm_messages WHERE user_id = %s AND session_id = %s
ORDER BY id DESC LIMIT %s
"""
INSERT_MESSAGE = """
INSERT INTO llm_messages (job_id, session_id, user_id, role, content, tokens, partial)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (job_id, role, (coalesce(tool_call_id, ''))) DO NOTHING
"""
UPDATE_FINISHED = """
UPDATE llm_jobs SET status = %s, prompt_tokens = %s, completion_tokens = %s, cost_usd = 0,
    ttft_ms = %s, latency_ms = %s, error = %s, partial = %s, finished_at = now()
WHERE job_id = %s
"""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class PgPool:
    """A few autocommit AsyncConnections in a queue (psycopg_pool is not installed)."""

    def __init__(self, dsn: str, connections: list[psycopg.AsyncConnection[Any]]) -> None:
        self._dsn = dsn
        self._idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
        for conn in connections:
            self._idle.put_nowait(conn)

    @classmethod
    async def open(cls, dsn: str, size: int) -> PgPool:
        return cls(dsn, [await psycopg.AsyncConnection.connect(dsn, autocommit=True)
                         for _ in range(size)])

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = await self._idle.get()
        try:
            if conn.closed:  # Postgres restarted under us: reconnect, lazily
                conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
            cursor = await conn.execute(sql, params)
            return await cursor.fetchall() if cursor.description else []
        finally:
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        while not self._idle.empty():
            await self._idle.get_nowait().close()


class EventStream:
    """One job's Redis stream: every event is one awaited XADD, in seq order."""

    def __init__(self, client: aioredis.Redis, job_id: str, user_id: str, session_id: str) -> None:
        self.key = f"sse:chat:{job_id}"
        self._client = client
        self._ids = {"jobId": job_id, "userId": user_id, "sessionId": session_id, "attempt": 1}
        self._seq = 0

    async def emit(self, event: str, data: dict[str, Any]) -> None:
        fields = {"event": event, **self._ids, "seq": self._seq, "ts": now_ms(),
                  "data": json.dumps(data, separators=(",", ":"), ensure_ascii=False)}
        self._seq += 1
        await self._client.xadd(self.key, fields)


class TokenRelay(AsyncCallbackHandler):
    """LangChain's token callback: each new token becomes a `token` event before the next."""

    raise_error = True  # a failed XADD must fail the job, not be logged and skipped
    run_inline = True  # awaited directly: LangChain otherwise wraps each call in gather()

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        self.parts: list[str] = []
        self.first_token_at: float | None = None

    async def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
        if not isinstance(token, str) or not token:
            return  # the finish and usage chunks carry no text
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.parts.append(token)
        await self.stream.emit("token", {"text": token})


def decode_request(value: bytes | None) -> dict[str, Any] | None:
    """The request as a dict, or None unless its ids and message are non-empty strings."""
    try:
        request = json.loads(value or b"")
    except ValueError:
        return None
    required = ("jobId", "userId", "sessionId", "message")
    if not isinstance(request, dict) or not all(
            isinstance(request.get(k), str) and request[k] for k in required):
        return None
    return request


class Worker:
    def __init__(self, *, client: aioredis.Redis, pg: PgPool, llm: ChatOpenAI, model: str,
                 max_in_flight: int, max_tokens: int, timeout_s: float) -> None:
        self.client, self.pg, self.llm, self.model = client, pg, llm, model
        self.max_tokens, self.timeout_s = max_tokens, timeout_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self.running: dict[str, tuple[str, asyncio.Task[None]]] = {}  # job_id -> (user_id, task)
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False  # set by drain(): records polled after it are not started

    async def admit(self, value: bytes | None) -> None:
        request = decode_request(value)
        if request is None:
            log.warning("skipping a bad request: %r", (value or b"")[:200])
            return
        job_id = request["jobId"]
        if job_id in self.running:
            log.warning("job %s is already running here; duplicate skipped", job_id)
            return
        await self._slots.acquire()  # at max_in_flight the poll loop waits here
        if self.closed:
            self._slots.release()
            return
        task = asyncio.create_task(self.run_job(request), name=f"job {job_id}")
        self.running[job_id] = (request["userId"], task)
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._ended(job_id, t))

    def _ended(self, job_id: str, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.running.get(job_id, (None, None))[1] is task:
            del self.running[job_id]
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("job %s crashed", job_id, exc_info=task.exception())

    def cancel(self, job_id: str, user_id: str) -> None:
        owner, task = self.running.get(job_id, (None, None))
        if task is None:
            log.info("cancel for %s: not running here", job_id)
        elif owner != user_id:
            log.warning("cancel for %s from %s, who does not own it: ignored", job_id, user_id)
        else:
            task.cancel("cancelled by its owner")

    async def run_job(self, request: dict[str, Any]) -> None:
        job_id, user_id, session_id = request["jobId"], request["userId"], request["sessionId"]
        mode = request.get("mode", "gen")
        params = request.get("params") or {}
        stream = EventStream(self.client, job_id, user_id, session_id)
        relay = TokenRelay(stream)
        began = time.monotonic()
        reply: BaseMessage | None = None
        status, error = "completed", None
        timeout_s = self.timeout_s
        try:
            timeout_s = min(timeout_s, float(request.get("timeoutS") or timeout_s))
            await self.pg.execute(UPSERT_RUNNING, (job_id, user_id, session_id,
                                                   request.get("traceId"), mode, self.model))
            await stream.emit("started", {"model": self.model, "mode": mode, "attempt": 1})
            if mode == "rag":
                status = "failed"
                error = {"code": "rag_unavailable", "retryable": False,
                         "message": "RAG is not available on this worker"}
            else:
                async with asyncio.timeout(timeout_s):
                    rows = await self.pg.execute(SELECT_HISTORY, (user_id, session_id, HISTORY_ROWS))
                    history = [HumanMessage(text) if role == "user" else AIMessage(text)
                               for role, text in reversed(rows)]
                    await self.pg.execute(INSERT_MESSAGE, (job_id, session_id, user_id, "user",
                                                           request["message"], None, False))
                    messages = [SystemMessage(SYSTEM_PROMPT), *history,
                                HumanMessage(request["message"])]
                    reply = await self.llm.ainvoke(
                        messages, config={"callbacks": [relay]}, stop=params.get("stop"),
                        **self._call_params(params))
        except asyncio.CancelledError:
            status = "cancelled"  # the owner's cancel, or SIGTERM
        except TimeoutError:
            status = "timeout"
            error = {"code": "timeout", "retryable": True,
                     "message": f"the job took longer than its {timeout_s:g} s timeout"}
        except openai.APIError as exc:
            status = "failed"
            retryable = not isinstance(exc, openai.APIStatusError) or exc.status_code >= 500
            error = {"code": "provider_unavailable", "message": str(exc), "retryable": retryable}
        except Exception as exc:  # Postgres, Redis, a malformed field: this job fails, not the worker
            log.exception("job %s failed", job_id)
            status = "failed"
            error = {"code": "internal", "message": f"{type(exc).__name__}: {exc}",
                     "retryable": False}
        # From here on a late cancel must not cut the terminal records short.
        self.running.pop(job_id, None)
        await self._finish(stream, relay, request, reply, status, error, began)

    def _call_params(self, params: dict[str, Any]) -> dict[str, Any]:
        # langchain-openai 1.x renames max_tokens to max_completion_tokens, which llama.cpp's
        # server (the local vendor) ignores; extra_body sends the field every vendor reads.
        max_tokens = params.get("maxTokens") or self.max_tokens
        call: dict[str, Any] = {"extra_body": {"max_tokens": max_tokens}}
        for ours, theirs in (("temperature", "temperature"), ("topP", "top_p")):
            if params.get(ours) is not None:
                call[theirs] = params[ours]
        return call

    async def _finish(self, stream: EventStream, relay: TokenRelay, request: dict[str, Any],
                      reply: BaseMessage | None, status: str, error: dict[str, Any] | None,
                      began: float) -> None:
        job_id = request["jobId"]
        text = reply.content if reply is not None and isinstance(reply.content, str) \
            else "".join(relay.parts)
        partial = status != "completed" and bool(text)
        usage = getattr(reply, "usage_metadata", None) or {}
        prompt_tokens = usage.get("input_tokens")
        completion_tokens = usage.get("output_tokens", len(relay.parts))
        first = relay.first_token_at
        try:
            if status == "completed" and reply is not None:
                await stream.emit("final", {
                    "text": text, "finishReason": reply.response_metadata.get("finish_reason", "stop"),
                    "usage": {"promptTokens": prompt_tokens or 0,
                              "completionTokens": completion_tokens,
                              "totalTokens": (prompt_tokens or 0) + completion_tokens},
                    "costUsd": 0.0, "model": self.model})
            elif error is not None:
                await stream.emit("error", error)
            if text:
                await self.pg.execute(INSERT_MESSAGE, (job_id, request["sessionId"],
                                                       request["userId"], "assistant", text,
                                                       completion_tokens, partial))
            await self.pg.execute(UPDATE_FINISHED, (
                status, prompt_tokens, completion_tokens,
                None if first is None else round((first - began) * 1000),
                round((time.monotonic() - began) * 1000),
                None if error is None else f"{error['code']}: {error['message']}", partial, job_id))
            await stream.emit("done", {"status": status, "partial": partial})
            await self.client.expire(stream.key, STREAM_TTL_S)
        except (psycopg.Error, aioredis.RedisError) as exc:
            log.error("job %s: terminal records not written (%s: %s)", job_id,
                      type(exc).__name__, exc)

    async def drain(self) -> None:
        self.closed = True
        for _, task in list(self.running.values()):
            task.cancel("the worker is shutting down")
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=SHUTDOWN_GRACE_S)


# --- Kafka: blocking calls, each consumer in its own thread ------------------------------

async def consume(consumer: confluent_kafka.Consumer, thread: ThreadPoolExecutor,
                  stopping: asyncio.Event, handle: Any) -> None:
    loop = asyncio.get_running_loop()
    while not stopping.is_set():
        for record in await loop.run_in_executor(thread, poll_records, consumer):
            await handle(record.value())


# --- /readyz ---------------------------------------------------------------------------------

async def main(args: argparse.Namespace) -> None:
    stopping, ready = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    health = await serve_health(args.health_port, ready)
    # redis-py 8 caps an asyncio pool at 100 and raises past it; the old design (redis-py 4/5)
    # opened one connection per concurrent caller, so allow one per job in flight.
    client = aioredis.Redis.from_url(args.redis, max_connections=args.max_in_flight + 8)
    await client.ping()
    pg = await PgPool.open(args.postgres, args.pool_size)
    await pg.execute("SELECT 1")
    # No cap on concurrent streams, but a modest keep-alive pool: httpcore rescans every idle
    # connection once per idle connection on each request start and end (O(idle^2)); with
    # 1000 idle connections kept, that scan alone cost ~40% of the CPU at 1000 jobs.
    # openai's own client class (openai 3 builds on httpx2, not httpx), with httpx2's limits
    # and openai's timeout: an httpx.Timeout here is refused by openai 3.
    http = openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(
        max_connections=None, max_keepalive_connections=HTTP_KEEPALIVE))
    llm = ChatOpenAI(model=args.model, base_url=args.llm_url, streaming=True, stream_usage=True,
                     api_key=os.environ.get("LOCAL_LLM_API_KEY") or "not-needed",  # type: ignore[arg-type]
                     max_retries=0, timeout=openai.Timeout(args.timeout_s, connect=5.0),
                     http_async_client=http)
    worker = Worker(client=client, pg=pg, llm=llm, model=args.model, max_in_flight=args.max_in_flight,
                    max_tokens=args.max_tokens, timeout_s=args.timeout_s)
    settings = {"bootstrap.servers": args.kafka, "fetch.wait.max.ms": 10,
                "session.timeout.ms": 6000, "log.connection.close": False}
    requests = confluent_kafka.Consumer({**settings, "group.id": args.group,
                                         "enable.auto.commit": True, "auto.offset.reset": "earliest"})
    control = confluent_kafka.Consumer({**settings, "enable.auto.commit": False,
                                        "group.id": f"{args.group}.control.{uuid.uuid4().hex[:8]}"})
    request_thread, control_thread = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    try:
        await asyncio.to_thread(ensure_topics, args.kafka, [args.request_topic, args.control_topic])
        await loop.run_in_executor(control_thread, assign_at_end, control, args.control_topic)
        await loop.run_in_executor(request_thread, requests.subscribe, [args.request_topic])
        ready.set()
        log.warning("seed-style peer ready: %s -> sse:chat:{job_id}", args.request_topic)

        async def on_control(value: bytes | None) -> None:
            try:
                message = json.loads(value or b"")
            except ValueError:
                log.warning("skipping a bad control message: %r", (value or b"")[:200])
                return
            if isinstance(message, dict) and message.get("type") == "cancel":
                worker.cancel(str(message.get("jobId")), str(message.get("userId")))

        loops = [asyncio.create_task(consume(requests, request_thread, stopping, worker.admit)),
                 asyncio.create_task(consume(control, control_thread, stopping, on_control))]
        stop_wait = asyncio.create_task(stopping.wait())
        # A consume loop that dies (the broker refused us) stops the worker too.
        await asyncio.wait([*loops, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        stopping.set()
        await worker.drain()  # before joining the loops: admit() may wait for a free slot
        await asyncio.wait(loops)  # each ends within one poll
        for task in loops:
            task.result()
    finally:
        ready.clear()
        await loop.run_in_executor(request_thread, requests.close)
        await loop.run_in_executor(control_thread, control.close)
        request_thread.shutdown()
        control_thread.shutdown()
        await pg.close()
        await client.aclose()
        await http.aclose()
        health.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return peer_arguments("python -m bench.peers.seed_style", __doc__, "chat-seed-style").parse_args(argv)

if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=arguments.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main(arguments))
