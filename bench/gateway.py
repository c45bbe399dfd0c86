"""Our gateway against a plain SSE relay: many open event streams, one run, one stack.

Starts the local stack (Tansu, Redis, Postgres), then for each side in turn (our
gateway, `bin/chat-actors gateway`; the plain peer, bench/peers/sse_plain.py) opens
`--clients` concurrent SSE responses from a separate client process, one job each,
and appends token entries to the jobs' Redis streams at each `--rates` (events per
second over all streams) for `--seconds`. Each entry carries the monotonic time just
before its XADD; the client notes the time its bytes arrive, so the latency is XADD
to the client's socket, both relays included. CPU is the server process's own
user+system time over the window (psutil), divided by the events the clients got;
Redis's CPU is counted the same way. RSS per connection is the server's growth from
idle to every client connected, over the clients.

    bin/chat-actors bench gateway                       # 1,000 clients, about 8 minutes
    bin/chat-actors bench gateway --quick               # 100 clients, a smoke run
    bin/chat-actors bench gateway --only gateway --rates 2000

Prints one table (gateway, peer, ratio) and writes it as JSON (`--json`, default
bench/results/gateway.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

import hiredis
import jwt
import psutil
import redis

from bench import machine, result_options, wait_ready, write_result
from bench.perf import Measured, percentile, ratio
from tools import local_stack

ROOT = Path(__file__).resolve().parent.parent
USER = "bench-user"
OWNER_PREFIX = "chat-actors:gateway:owner:"  # gateway/app.py (this process need not import it)
CONNECT_BATCH = 100  # clients connecting at once (a listen backlog is about this size)
SECRET_ENV = "CHAT_ACTORS_JWT_SECRET"
QUICK_CLIENTS, QUICK_SECONDS = 100, 2.0


# ---------------------------------------------------------------- the servers


@dataclass
class Server(Measured):
    port: int


def _spawn(name: str, argv: list[str], port: int, ready_path: str, workdir: Path,
           env: dict[str, str]) -> Server:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=out,
                                   env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    server = Server(name=name, process=process, log=log, port=port)
    try:
        wait_ready(server.alive, f"http://127.0.0.1:{server.port}{ready_path}",
                   time.perf_counter() + 60, f"{server.name} was not ready within 60 s", server.log)
    except BaseException:
        server.stop()  # not left behind: a bench stops what it started
        raise
    return server


@dataclass
class Stack:
    kafka: local_stack.Service
    redis: local_stack.Service
    postgres: local_stack.Service
    workdir: Path
    readers: int | None = None  # gateway.readers (None: the default config's)
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def gateway(self) -> Server:
        port = local_stack.free_port()
        config = self.workdir / "gateway.toml"
        config.write_text(local_stack.stack_config(
            kafka=self.kafka.url, redis=self.redis.url, postgres=self.postgres.url,
            llm_url="http://127.0.0.1:9/v1", sections={
                # Every client is the one USER: the cap on one user's streams (32 by
                # default) would refuse all but a few. The relay is measured, not the cap.
                "gateway": {"host": "127.0.0.1", "port": port, "dev_signin": False,
                            "max_streams_per_user": 100_000,
                            **({} if self.readers is None else {"readers": self.readers})}}))
        return _spawn("gateway", [sys.executable, "-m", "tools.cli", "gateway", "--config",
                                  str(config)], port, "/readyz", self.workdir,
                      {SECRET_ENV: self.secret})

    def peer(self) -> Server:
        port = local_stack.free_port()
        return _spawn("peer", [sys.executable, "-m", "bench.peers.sse_plain", "--redis",
                               self.redis.url, "--port", str(port)], port, "/healthz",
                      self.workdir, {SECRET_ENV: self.secret})

    def token(self) -> str:
        return jwt.encode({"sub": USER, "exp": int(time.time()) + 3600}, self.secret,
                          algorithm="HS256")


@contextlib.contextmanager
def open_stack() -> Iterator[Stack]:
    with local_stack.workdir("chat-actors-bench-gateway-") as workdir:
        kafka, rds, pg = local_stack.start_core(workdir)
        try:
            yield Stack(kafka, rds, pg, workdir)
        finally:
            for service in (pg, rds, kafka):
                service.stop()


# ---------------------------------------------------------------- the jobs' streams


def stream_of(job_id: str) -> str:
    return f"sse:chat:{job_id}"


def entry(job_id: str, event: str, seq: int, data: dict[str, Any]) -> dict[str, str | int]:
    """An entry as the worker writes it (contract 1.4's fields)."""
    return {"event": event, "jobId": job_id, "userId": USER, "sessionId": f"s-{job_id}",
            "attempt": 1, "seq": seq, "ts": int(time.time() * 1000),
            "data": json.dumps(data, separators=(",", ":"))}


class Appender:
    """XADDs written on one raw connection, packed by hiredis and sent in one write per
    batch. The producer stands in for the workers and shares the two cores with both
    sides: through redis-py's pipeline it cost about 38 µs per entry, a third of a core
    at 10,000 events/s taken from whichever side was measured; this costs a few."""

    def __init__(self, client: redis.Redis) -> None:
        options = client.connection_pool.connection_kwargs
        if "path" in options:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(options["path"])
        else:
            self.sock = socket.create_connection((options.get("host", "localhost"),
                                                  int(options.get("port", 6379))))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = hiredis.Reader()
        if options.get("password"):
            user = [options["username"]] if options.get("username") else []
            self.call([("AUTH", *user, options["password"])])
        if int(options.get("db") or 0):
            self.call([("SELECT", str(options["db"]))])

    def call(self, commands: Sequence[Sequence[str | int]]) -> None:
        """Each command sent in one write; every reply read, an error raised."""
        self.sock.sendall(b"".join(hiredis.pack_command(tuple(c)) for c in commands))
        left = len(commands)
        while left:
            reply = self.parser.gets()
            if reply is False:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("redis closed the producer's connection")
                self.parser.feed(data)
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise reply
            left -= 1

    def xadd(self, items: Sequence[tuple[str, dict[str, str | int]]]) -> None:
        self.call([("XADD", stream, "*", *[part for pair in fields.items() for part in pair])
                   for stream, fields in items])

    def close(self) -> None:
        self.sock.close()


class Jobs:
    """One job per client: its owner key, its stream, and what was appended to it."""

    def __init__(self, client: redis.Redis, count: int) -> None:
        self.client = client
        self.appender = Appender(client)
        self.ids = [f"bench-{uuid.uuid4().hex[:20]}" for _ in range(count)]
        self.seq = dict.fromkeys(self.ids, 0)
        pipe = client.pipeline(transaction=False)
        for job_id in self.ids:
            pipe.set(OWNER_PREFIX + job_id, USER, ex=3600)
            pipe.xadd(stream_of(job_id), entry(job_id, "started", 0, {"model": "bench"}))
        pipe.execute()
        self.appended = 0

    def _tokens(self, job_ids: Sequence[str], stamp: int) -> None:
        """One token entry for each of `job_ids`, holding `stamp` (the monotonic time
        just before they are sent), in one write."""
        batch: list[tuple[str, dict[str, str | int]]] = []
        for job_id in job_ids:
            self.seq[job_id] += 1
            batch.append((stream_of(job_id), entry(job_id, "token", self.seq[job_id],
                                                   {"text": "x ", "sentNs": stamp})))
        self.appender.xadd(batch)

    def produce(self, rate: float, seconds: float) -> int:
        """Token entries at `rate` per second over all streams, round robin; each holds
        the monotonic time just before its batch is built."""
        began, sent, turn = time.perf_counter(), 0, 0
        while (elapsed := time.perf_counter() - began) < seconds:
            due = int(elapsed * rate) - sent
            if due > 0:
                count = len(self.ids)
                self._tokens([self.ids[(turn + i) % count] for i in range(due)],
                             time.monotonic_ns())
                turn += due
                sent += due
            time.sleep(0.002)
        self.appended += sent
        return sent

    def produce_answers(self, per_stream: tuple[float, float], seconds: float) -> int:
        """Each stream receives its answer's tokens at its own pace, drawn once from
        `per_stream` (tokens per second), at a random phase: what 1,000 answers being
        written at once look like. Returns how many were sent."""
        rng = random.Random(7)
        schedule: list[tuple[float, str]] = []
        for job_id in self.ids:
            pace = rng.uniform(*per_stream)
            at = rng.uniform(0, 1 / pace)
            while at < seconds:
                schedule.append((at, job_id))
                at += 1 / pace
        schedule.sort()
        began, sent = time.perf_counter(), 0
        while sent < len(schedule):
            elapsed = time.perf_counter() - began
            due = sent
            while due < len(schedule) and schedule[due][0] <= elapsed:
                due += 1
            if due > sent:
                self._tokens([job_id for _, job_id in schedule[sent:due]], time.monotonic_ns())
                sent = due
            time.sleep(0.002)
        self.appended += sent
        return sent

    def finish(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        for job_id in self.ids:
            self.seq[job_id] += 1
            pipe.xadd(stream_of(job_id), entry(job_id, "done", self.seq[job_id],
                                               {"status": "succeeded"}))
        pipe.execute()

    def delete(self) -> None:
        self.appender.close()
        for start in range(0, len(self.ids), 500):
            chunk = self.ids[start:start + 500]
            self.client.delete(*[stream_of(j) for j in chunk], *[OWNER_PREFIX + j for j in chunk])


# ---------------------------------------------------------------- the client process

# An SSE event as either side writes it (LF or CRLF lines).
EVENT = re.compile(rb"id: (\d+)-(\d+)\r?\nevent: (\w+)\r?\ndata: ([^\r\n]*)")
SENT = re.compile(rb'"sentNs":(\d+)')


@dataclass
class Tally:
    latencies_ns: list[int] = field(default_factory=list[int])
    tokens: int = 0
    repeats: int = 0  # an entry id at or before one already seen on that response
    refused: list[str] = field(default_factory=list[str])  # status lines other than 200
    ended: int = 0  # responses that reached `done`


class SseClient(asyncio.Protocol):
    """One SSE response read off a raw socket: events are counted, token latencies noted."""

    def __init__(self, request: bytes, tally: Tally, started: asyncio.Future[None],
                 ended: asyncio.Future[None]) -> None:
        self.request, self.tally = request, tally
        self.started, self.ended = started, ended
        self.buffer = b""
        self.last = (0, 0)
        self.headers = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if not self.headers:
            self.headers = True
            if not data.startswith(b"HTTP/1.1 200"):
                self.tally.refused.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))
                self._close()
                return
        self.buffer += data
        end = max(self.buffer.rfind(b"\n\n"), self.buffer.rfind(b"\n\r\n"))
        if end < 0:
            return
        block, self.buffer = self.buffer[:end], self.buffer[end + 2:]
        for match in EVENT.finditer(block):
            key = (int(match[1]), int(match[2]))
            if key <= self.last:
                self.tally.repeats += 1
                continue
            self.last = key
            event = match[3]
            if event == b"token":
                sent = SENT.search(match[4])
                if sent:
                    self.tally.tokens += 1
                    self.tally.latencies_ns.append(now - int(sent[1]))
            elif event == b"started" and not self.started.done():
                self.started.set_result(None)
            elif event == b"done":
                self.tally.ended += 1
                self._close()

    def _close(self) -> None:
        for future in (self.started, self.ended):
            if not future.done():
                future.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._close()


async def run_clients(port: int, token: str, jobs: list[str], commands: IO[str]) -> None:
    """Open every response, say `{"connected": n}`, then answer `count` with what arrived
    and `finish` (after the `done` entries) with the whole tally."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    ends: list[asyncio.Future[None]] = []
    for start in range(0, len(jobs), CONNECT_BATCH):
        starts = []
        for job_id in jobs[start:start + CONNECT_BATCH]:
            request = (f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                       f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
                       ).encode()
            started, ended = loop.create_future(), loop.create_future()
            ends.append(ended)
            starts.append(started)
            await loop.create_connection(
                lambda r=request, s=started, e=ended: SseClient(r, tally, s, e),
                "127.0.0.1", port)
        await asyncio.wait_for(asyncio.gather(*starts), 60)
    say({"connected": len(jobs) - len(tally.refused), "refused": tally.refused[:3]})
    while line := await loop.run_in_executor(None, commands.readline):  # not on the loop
        if line.strip() == "count":
            say({"tokens": tally.tokens})
        elif line.strip() == "lap":  # the latencies since the last lap, then forgotten
            lat = [v / 1e6 for v in tally.latencies_ns]
            tally.latencies_ns = []
            say({"tokens": tally.tokens,
                 "p50_ms": percentile(lat, 50) if lat else None,
                 "p99_ms": percentile(lat, 99) if lat else None,
                 "max_ms": max(lat) if lat else None})
        elif line.strip() == "finish":
            await asyncio.wait(ends, timeout=60)
            lat = [v / 1e6 for v in tally.latencies_ns]
            say({"tokens": tally.tokens, "repeats": tally.repeats, "ended": tally.ended,
                 "refused": len(tally.refused),
                 "p50_ms": percentile(lat, 50) if lat else None,
                 "p99_ms": percentile(lat, 99) if lat else None,
                 "max_ms": max(lat) if lat else None})
            return


def say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


class Clients:
    """The client process (this module with --serve-clients), driven over its stdin."""

    def __init__(self, server: Server, token: str, jobs: Jobs) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.gateway", "--serve-clients", str(server.port)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "BENCH_TOKEN": token,
                 "BENCH_JOBS": ",".join(jobs.ids), "BENCH_NOFILE": str(max(soft, hard))})

    def ask(self, command: str | None = None) -> dict[str, Any]:
        """Send a command (or none: the connect report comes unasked) and read the answer."""
        assert self.process.stdin is not None and self.process.stdout is not None
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the client process stopped ({self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


# ---------------------------------------------------------------- one side


Result = dict[str, Any]


def redis_cpu_of(stack: Stack) -> Callable[[], float]:
    """Redis's user+system CPU seconds so far."""
    process = psutil.Process(stack.redis.process.pid)

    def cpu() -> float:
        times = process.cpu_times()
        return times.user + times.system

    return cpu


class Load(NamedTuple):
    sent: int
    produce_s: float  # how long producing took
    got: int  # tokens the clients had when it ended (or the wait did)
    cpu_s: float  # the server's CPU meanwhile
    redis_cpu_s: float


def run_load(server: Server, client: Clients, redis_cpu: Callable[[], float],
             produce: Callable[[], int], received: int, wait_s: float) -> Load:
    """`produce()` (it says how many it sent), then wait up to `wait_s` for the clients
    to have `received` plus those; the CPU both spent over all of it."""
    cpu0, rcpu0 = server.cpu_s(), redis_cpu()
    began = time.perf_counter()
    sent = produce()
    produce_s = time.perf_counter() - began
    deadline = time.perf_counter() + wait_s
    while (got := client.ask("count")["tokens"]) < received + sent and \
            time.perf_counter() < deadline:
        server.alive()
        time.sleep(0.05)
    return Load(sent, produce_s, got, server.cpu_s() - cpu0, redis_cpu() - rcpu0)


def measure(stack: Stack, server: Server, clients: int, rates: list[float],
            seconds: float) -> Result:
    rds = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    redis_cpu = redis_cpu_of(stack)
    result: Result = {}
    try:
        warm = Jobs(rds, 20)  # first requests pay one-time costs (imports, pools)
        with _clients(server, stack.token(), warm) as warm_up:
            warm_up.ask()
            warm.produce(200, 0.5)
            warm.finish()
            warm_up.ask("finish")
        warm.delete()
        idle = server.rss()
        jobs = Jobs(rds, clients)
        with _clients(server, stack.token(), jobs) as client:
            began = time.perf_counter()
            connected = client.ask()
            result["connect_s"] = time.perf_counter() - began
            result["connected"] = connected["connected"]
            if connected["refused"]:
                raise RuntimeError(f"{server.name} refused clients: {connected['refused']}")
            time.sleep(1.0)  # settle: every handler has reached its wait
            loaded = server.rss()
            result["rss_idle_mb"] = idle / 2**20
            result["kb_per_connection"] = (loaded - idle) / 1024 / clients
            result["redis_connections"] = int(rds.info("clients")["connected_clients"])
            received = 0
            for rate in rates:
                load = run_load(server, client, redis_cpu,
                                lambda rate=rate: jobs.produce(rate, seconds), received, 30)
                relayed = load.got - received
                received = load.got
                result[f"rate_{rate:g}"] = {
                    "sent": load.sent, "relayed": relayed,
                    "cpu_us_per_event": 1e6 * load.cpu_s / max(relayed, 1),
                    "redis_cpu_us_per_event": 1e6 * load.redis_cpu_s / max(relayed, 1)}
            jobs.finish()
            tally = client.ask("finish")
        result.update(missed=jobs.appended - tally["tokens"], repeats=tally["repeats"],
                      ended=tally["ended"], p50_ms=tally["p50_ms"], p99_ms=tally["p99_ms"],
                      max_ms=tally["max_ms"])
        jobs.delete()
    finally:
        rds.close()
    return result


@contextlib.contextmanager
def _clients(server: Server, token: str, jobs: Jobs) -> Iterator[Clients]:
    client = Clients(server, token, jobs)
    try:
        yield client
    finally:
        client.close()


def latency_by_rate(stack: Stack, server: Server, clients: int, rates: list[float],
                    seconds: float) -> Result:
    """Each rate on its own connections, so its latencies are its own."""
    result: Result = {}
    for index, rate in enumerate(rates):
        part = measure(stack, server, clients, [rate], seconds)
        rate_key = f"rate_{rate:g}"
        result[rate_key] = {**part.pop(rate_key), "p50_ms": part.pop("p50_ms"),
                            "p99_ms": part.pop("p99_ms"), "max_ms": part.pop("max_ms")}
        for key in ("missed", "repeats"):
            result[key] = result.get(key, 0) + part.pop(key)
        if index == 0:
            result.update(part)
    return result


SATURATED_MS = 100.0  # a step whose p99 is above this is saturated
LAP_WAIT_S = 15.0  # how long a step waits for what it sent to arrive


def ramp(stack: Stack, server: Server, clients: int, steps: list[float], seconds: float,
         answers: tuple[float, float] | None, answer_seconds: float) -> Result:
    """One set of connections: each step of the ramp in turn (events per second over
    all streams) until one saturates, then the answers scenario (every stream's answer
    at its own pace). Each step's latencies are its own (the client's `lap`)."""
    rds = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    redis_cpu = redis_cpu_of(stack)
    result: Result = {}
    try:
        jobs = Jobs(rds, clients)
        with _clients(server, stack.token(), jobs) as client:
            connected = client.ask()
            if connected["refused"]:
                raise RuntimeError(f"{server.name} refused clients: {connected['refused']}")
            time.sleep(1.0)
            received = 0

            def step(produce: Callable[[], int]) -> Result:
                nonlocal received
                load = run_load(server, client, redis_cpu, produce, received, LAP_WAIT_S)
                lap = client.ask("lap")
                relayed, received = lap["tokens"] - received, lap["tokens"]
                return {"sent": load.sent, "offered_evs": load.sent / load.produce_s,
                        "relayed": relayed,
                        "cpu_us_per_event": 1e6 * load.cpu_s / max(relayed, 1),
                        "redis_cpu_us_per_event": 1e6 * load.redis_cpu_s / max(relayed, 1),
                        "p50_ms": lap["p50_ms"], "p99_ms": lap["p99_ms"],
                        "max_ms": lap["max_ms"]}

            steps_done: Result = {}
            for rate in steps:
                measured = steps_done[f"rate_{rate:g}"] = step(
                    lambda rate=rate: jobs.produce(rate, seconds))
                if measured["p99_ms"] is None or measured["p99_ms"] > SATURATED_MS:
                    break
            result["ramp"] = steps_done
            unsaturated = [rate for rate in steps if (m := steps_done.get(f"rate_{rate:g}"))
                           and m["p99_ms"] is not None and m["p99_ms"] <= SATURATED_MS]
            result["saturation_evs"] = max(unsaturated, default=0.0)
            if answers is not None:
                result["answers"] = step(lambda: jobs.produce_answers(answers, answer_seconds))
            jobs.finish()
            tally = client.ask("finish")
        result.update(missed=jobs.appended - tally["tokens"], repeats=tally["repeats"])
        jobs.delete()
    finally:
        rds.close()
    return result


# ---------------------------------------------------------------- the report


def _load_rows(key: str, label: str) -> list[tuple[str, str, str, str]]:
    return [(f"{key}.p50_ms", f"{label}: XADD -> client p50 ms", "lower", ",.2f"),
            (f"{key}.p99_ms", f"{label}: XADD -> client p99 ms", "lower", ",.2f"),
            (f"{key}.cpu_us_per_event", f"{label}: server CPU us/event", "lower", ",.1f"),
            (f"{key}.redis_cpu_us_per_event", f"{label}: Redis CPU us/event", "lower", ",.1f")]


def rows(rates: list[float], steps: Sequence[float] = (),
         answers: tuple[float, float] | None = None) -> list[tuple[str, str, str, str]]:
    """(key path, label, better, format)"""
    table = [("connect_s", "connect every client s", "lower", ",.1f"),
             ("kb_per_connection", "RSS KB per open connection", "lower", ",.1f"),
             ("redis_connections", "Redis connections held", "lower", ",.0f")]
    for rate in rates:
        key = f"rate_{rate:g}"
        table += [(f"{key}.p50_ms", f"XADD -> client p50 ms, {rate:,.0f} ev/s", "lower", ",.2f"),
                  (f"{key}.p99_ms", f"XADD -> client p99 ms, {rate:,.0f} ev/s", "lower", ",.2f"),
                  (f"{key}.cpu_us_per_event", f"server CPU us/event, {rate:,.0f} ev/s", "lower",
                   ",.1f"),
                  (f"{key}.redis_cpu_us_per_event", f"Redis CPU us/event, {rate:,.0f} ev/s",
                   "lower", ",.1f")]
    if steps:
        table.append(("saturation_evs", f"ramp: most ev/s with p99 <= {SATURATED_MS:g} ms",
                      "higher", ",.0f"))
    for rate in steps:
        table += _load_rows(f"ramp.rate_{rate:g}", f"ramp {rate:,.0f} ev/s")
    if answers is not None:
        label = f"answers {answers[0]:g}-{answers[1]:g} tok/s"
        table.append(("answers.offered_evs", f"{label}: ev/s offered", "higher", ",.0f"))
        table += _load_rows("answers", label)
    return table + [("missed", "events missed (must be 0)", "lower", ",.0f"),
                    ("repeats", "events repeated (must be 0)", "lower", ",.0f")]


def report(results: dict[str, Result], rates: list[float], steps: Sequence[float] = (),
           answers: tuple[float, float] | None = None) -> str:
    def value(name: str, path: str) -> float | None:
        node: Any = results.get(name, {})
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    lines = [f"{'':48} {'gateway':>11} {'peer':>11} {'ratio':>8}"]
    for path, label, better, fmt in rows(rates, steps, answers):
        ours, peer = value("gateway", path), value("peer", path)
        if ours is None and peer is None:
            continue
        r = ratio(ours, peer, better)
        cells = [f"{v:{fmt}}" if v is not None else "-" for v in (ours, peer)]
        lines.append(f"{label:48} {cells[0]:>11} {cells[1]:>11} "
                     f"{(f'{r:,.1f}x' if r is not None else '-'):>8}")
    lines.append("ratio: how many times better the gateway is (peer / gateway for lower-is-better)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-actors bench gateway",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000, help="open SSE responses (1000)")
    parser.add_argument("--rates", default="500,1000,2000",
                        help="token entries per second over all streams, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each rate runs")
    parser.add_argument("--ramp", default="2000,5000,10000,15000,20000,30000,40000",
                        help="then rates on one set of connections, up to the first that "
                             f"saturates (p99 over {SATURATED_MS:g} ms); empty: none")
    parser.add_argument("--answers", default="30-50",
                        help="then every stream's answer at its own pace, drawn from this "
                             "range of tokens per second; empty: none")
    parser.add_argument("--readers", type=int, help="the gateway's gateway.readers (default: its config's)")
    result_options(parser, "gateway", f"at most {QUICK_CLIENTS} clients and "
                   f"{QUICK_SECONDS:g} s per rate, both sides (under a minute)")
    parser.add_argument("--only", choices=("gateway", "peer"), help="run one side")
    parser.add_argument("--serve-clients", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_clients is not None:
        return serve_clients(args.serve_clients)
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates: comma-separated numbers, not {args.rates!r}")
    if not rates or min(rates) <= 0:
        parser.error("--rates: at least one positive rate")
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients and --seconds must be positive")
    steps, answers = _load_options(parser, args.ramp, args.answers)
    if args.quick:
        args.clients = min(args.clients, QUICK_CLIENTS)
        args.seconds = min(args.seconds, QUICK_SECONDS)
        steps = steps[:2]
    starts: dict[str, Callable[[Stack], Server]] = {"gateway": Stack.gateway, "peer": Stack.peer}
    results: dict[str, Result] = {}
    began = time.perf_counter()
    with open_stack() as stack:
        stack.readers = args.readers
        for name, start in starts.items():
            if args.only not in (None, name):
                continue
            print(f"  {name}: {args.clients} clients ...", end="", flush=True)
            t = time.perf_counter()
            server = start(stack)
            try:
                results[name] = latency_by_rate(stack, server, args.clients, rates, args.seconds)
                if steps or answers:
                    loaded = ramp(stack, server, args.clients, steps, args.seconds, answers,
                                  args.seconds)
                    for key in ("missed", "repeats"):
                        results[name][key] += loaded.pop(key)
                    results[name].update(loaded)
            finally:
                server.stop()
            print(f" {time.perf_counter() - t:.0f} s", flush=True)
    total = time.perf_counter() - began
    print(f"\nthe gateway vs a plain SSE relay, {args.clients:,} concurrent clients "
          f"({total / 60:.1f} min; {machine()['cpu']}, {os.cpu_count()} cores)\n")
    print(report(results, rates, steps, answers))
    write_result(args.json, quick=args.quick, wall_s=total, clients=args.clients, rates=rates,
                 seconds=args.seconds, ramp=steps, answers=answers, results=results)
    return 0


def _load_options(parser: argparse.ArgumentParser, ramp_text: str, answers_text: str
                  ) -> tuple[list[float], tuple[float, float] | None]:
    """--ramp (rates, rising) and --answers (LOW-HIGH tokens per second per stream)."""
    try:
        steps = [float(r) for r in ramp_text.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--ramp: comma-separated numbers, not {ramp_text!r}")
    if any(r <= 0 for r in steps) or steps != sorted(steps):
        parser.error("--ramp: positive rates, rising")
    if not answers_text.strip():
        return steps, None
    low, _, high = answers_text.partition("-")
    try:
        pace = (float(low), float(high or low))
    except ValueError:
        parser.error(f"--answers: LOW-HIGH tokens per second, not {answers_text!r}")
    if not 0 < pace[0] <= pace[1]:
        parser.error("--answers: 0 < LOW <= HIGH")
    return steps, pace


def serve_clients(port: int) -> int:
    nofile = int(os.environ.get("BENCH_NOFILE", "0"))
    if nofile:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    import uvloop  # the lightest client loop: the clients share the cores with the servers

    uvloop.run(run_clients(port, os.environ["BENCH_TOKEN"], os.environ["BENCH_JOBS"].split(","),
                           sys.stdin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
