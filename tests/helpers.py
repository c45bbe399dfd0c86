"""Test helpers: run a worker in-process, produce requests, read a job's events."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import confluent_kafka
import httpx
import redis
import trio

from actors.supervisor import WorkerHandle, run_worker
from config import Config
from tools.chat_client import Assembled

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def worker_running(config: Config, **kwargs: Any) -> AsyncIterator[WorkerHandle]:
    """Run a worker until the block ends; then drain it as SIGTERM would."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(partial(run_worker, config, stop=stop,
                                             handle_signals=False, **kwargs))
        yield handle
        stop.set()


JWT_SECRET = "s" * 64  # the gateway's HS256 secret in the tests


@asynccontextmanager
async def gateway_running(config: Config, **kwargs: Any
                          ) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """Run a gateway until the block ends, with an HTTP client pointed at it."""
    from gateway.server import run_gateway

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(partial(run_gateway, config, stop=stop,
                                             handle_signals=False, **kwargs))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.port}",
                                     timeout=30) as client:
            yield handle, client
        stop.set()


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait for a condition on in-process state, checking it every 10 ms."""
    with trio.fail_after(timeout_s):
        # The worker owns this state and signals no event for it: check it often.
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def wait_calls(llm: Any, predicate: Callable[[list[Any]], Any], timeout_s: float = 60) -> None:
    """Wait (in a thread) until the scripted vendor's calls satisfy `predicate`."""
    await trio.to_thread.run_sync(lambda: llm.wait_until(predicate, timeout_s))


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    """GET /readyz from a thread (the worker may serve it on this very Trio loop)."""

    def get() -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    return await trio.to_thread.run_sync(get)


def request(message: str = "Hi there", **fields: Any) -> dict[str, Any]:
    body = {"jobId": f"job-{uuid.uuid4().hex[:12]}", "userId": "alice",
            "sessionId": f"s-{uuid.uuid4().hex[:8]}", "message": message}
    body.update(fields)
    return body


def produce(config: Config, *values: dict[str, Any] | bytes, topic: str | None = None,
            headers: list[tuple[str, bytes]] | None = None) -> None:
    producer = confluent_kafka.Producer({"bootstrap.servers": config.kafka.bootstrap_servers,
                                         "log.connection.close": False})
    for value in values:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        key = value.get("sessionId", "k").encode() if isinstance(value, dict) else b"k"
        producer.produce(topic or config.kafka.request_topic, key=key, value=raw,
                         headers=headers or [])
    assert producer.flush(10) == 0


def read_events(client: redis.Redis, config: Config, job_id: str,
                timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Block until the job's `done` entry, then return all its entries (data decoded)."""
    key = config.job_keys(job_id).stream
    after = "0-0"
    entries: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while True:
        # Block in short slices: redis-py 8 gives every socket a 5 s read timeout.
        found = client.xread({key: after}, block=1000, count=500)
        if not found:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no done for {job_id}; got {entries}")
            continue
        for entry_id, fields in found[0][1]:
            after = entry_id
            if fields["jobId"] != job_id:
                continue
            entries.append({**fields, "data": json.loads(fields["data"]), "id": entry_id})
            if fields["event"] == "done":
                return entries


def assembled(events: list[dict[str, Any]]) -> Assembled:
    """The answer a client following contract 3.3 assembles from `read_events`' entries."""
    answer = Assembled()
    for entry in events:
        answer.add(entry["event"], int(entry["attempt"]), entry["data"])
    return answer


async def events_of(client: redis.Redis, config: Config, job_id: str,
                    timeout_s: float = 60.0) -> list[dict[str, Any]]:
    return await trio.to_thread.run_sync(read_events, client, config, job_id, timeout_s)


def job_row(db: Any, job_id: str) -> dict[str, Any] | None:
    cur = db.execute("SELECT * FROM llm_jobs WHERE job_id = %s", (job_id,))
    row = cur.fetchone()
    if row is None:
        return None
    return dict(zip([c.name for c in cur.description], row, strict=True))


def message_rows(db: Any, job_id: str) -> list[dict[str, Any]]:
    cur = db.execute("SELECT * FROM llm_messages WHERE job_id = %s ORDER BY id", (job_id,))
    return [dict(zip([c.name for c in cur.description], r, strict=True)) for r in cur.fetchall()]


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


async def raw_status(port: int, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send `head` and the parts of a body over one connection, and return the status
    line the gateway answers with (it must answer without waiting for the rest)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head)
        for part in body_parts:
            await stream.send_all(part)
        received = b""
        while chunk := await stream.receive_some(4096):  # to the end: the gateway closes
            received += chunk
        return received.split(b"\r\n", 1)[0]
