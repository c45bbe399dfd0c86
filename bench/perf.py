"""chat-actors against its peers, scenario by scenario, in one run.

Starts the local stack (Tansu, Redis, Postgres) and a fast scripted
OpenAI-compatible vendor (bench/vendor.py, its own process), then runs every
scenario on chat-actors and on each peer: "lean" (bench/peers/lean_asyncio.py,
a best-effort asyncio worker written today) and "peer" (bench/peers/seed_style.py,
the older design chat-actors replaces). The same requests, the same stack, the
same vendor. Each scenario starts a fresh worker
process on fresh topics, so every start is also a cold-start sample and no
backlog leaks from one scenario into the next. CPU is the worker process's
own user+system time (psutil), never wall time; RSS is its resident memory.

A scenario that a side cannot finish in `--cap-s` seconds is measured over
that window (tokens delivered and CPU spent while it ran) and marked capped.

    bin/chat-actors bench perf                 # everything, about 7 minutes on 2 cores
    bin/chat-actors bench perf --quick         # a smoke run of every scenario, about 2 minutes
    bin/chat-actors bench perf --only chat-actors --scenarios throughput

Prints one table (each side, then chat-actors' ratio to each peer) and writes it
as JSON (`--json`, default bench/results/perf.json; results keyed by side).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import confluent_kafka
import psutil
import redis

from actors.adapters.kafka import ensure_topics
from bench import machine, result_options, wait_ready, write_result
from tools import local_stack
from tools.otlp_collector import Collector

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4
ANSWER_TOKENS = 500  # the streams that must outlast a step (cancels, held streams)
WINDOW = 64  # streams checked per poll while waiting for jobs to finish
READY_S = 120.0  # the longest a worker may take to say it is ready


@dataclass(frozen=True)
class Sizes:
    """How much each scenario does."""

    levels: tuple[int, ...]  # concurrent streams, one throughput scenario each
    rounds: int  # jobs one after another at the single-stream level
    answer_tokens: int  # of each throughput job
    jobs: int  # of the jobs scenario, 50 tokens each
    samples: int  # of each latency
    streams: tuple[int, ...]  # slow streams held open, one memory scenario each
    dev_runs: int  # `dev --once`, the last one measured
    cap_s: float  # the default --cap-s


FULL = Sizes(levels=(1, 50, 200, 1000), rounds=20, answer_tokens=500, jobs=2000, samples=100,
             streams=(1000, 5000), dev_runs=2, cap_s=30.0)
# Every scenario, each as small as still exercises it; 1,000 streams stay, since
# tests/test_deploy.py sizes the worker's memory request from that row of perf.json.
# The seed-style peer cannot keep up with any of them: the short cap bounds its share.
QUICK = Sizes(levels=(50,), rounds=5, answer_tokens=100, jobs=100, samples=10,
              streams=(1000,), dev_runs=1, cap_s=5.0)


# ---------------------------------------------------------------- the stack


@dataclass
class Stack:
    kafka: local_stack.Service
    redis: local_stack.Service
    postgres: local_stack.Service
    vendor_url: str
    vendor: subprocess.Popen[bytes]
    workdir: Path
    client: redis.Redis = field(init=False)

    def __post_init__(self) -> None:
        self.client = redis.Redis.from_url(self.redis.url, decode_responses=True)

    def vendor_call(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        with urllib.request.urlopen(urllib.request.Request(
                self.vendor_url + path, data=data, method="GET" if data is None else "POST"),
                timeout=10) as response:
            return json.loads(response.read())

    def pace(self, token_delay_s: float) -> None:
        self.vendor_call("/_pace", {"token_delay_s": token_delay_s})

    def active_streams(self) -> int:
        return int(self.vendor_call("/_stats")["active"])


@contextlib.contextmanager
def open_stack() -> Iterator[Stack]:
    with local_stack.workdir("chat-actors-perf-") as workdir:
        kafka, rds, pg = local_stack.start_core(workdir)
        vendor: subprocess.Popen[bytes] | None = None
        try:
            vendor = subprocess.Popen(
                [sys.executable, "-m", "bench.vendor", "--port", "0", "--tokens", "2048"],
                cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert vendor.stdout is not None
            url = vendor.stdout.readline().decode().strip()
            if not url.startswith("http"):
                raise RuntimeError("the scripted vendor did not start")
            migrate(kafka.url, rds.url, pg.url, url, workdir)
            stack = Stack(kafka, rds, pg, url, vendor, workdir)
            try:
                yield stack
            finally:
                stack.client.close()
        finally:
            if vendor is not None:
                local_stack.terminate(vendor, signal.SIGTERM, 10)
            for service in (pg, rds, kafka):
                service.stop()


def migrate(kafka: str, rds: str, pg: str, llm_url: str, workdir: Path) -> None:
    """The peer writes the same tables: create them once, before either runs."""
    config = workdir / "migrate.toml"
    config.write_text(local_stack.stack_config(kafka=kafka, redis=rds, postgres=pg, llm_url=llm_url))
    subprocess.run([sys.executable, "-m", "tools.cli", "migrate", "--config", str(config)],
                   cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


# ---------------------------------------------------------------- the workers


@dataclass(frozen=True)
class Topics:
    request: str
    control: str
    dlq: str
    group: str

    @classmethod
    def fresh(cls) -> Topics:
        tag = uuid.uuid4().hex[:8]
        return cls(f"perf.{tag}.request", f"perf.{tag}.control", f"perf.{tag}.dlq", f"perf-{tag}")


@dataclass
class Measured:
    """A process under measurement: its own CPU time and RSS, and its log when it dies."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def cpu_s(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n"
                               f"{self.log.read_text()[-3000:]}")

    def stop(self, *, drain: bool = True) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM if drain else signal.SIGKILL)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Running(Measured):
    topics: Topics
    health_port: int
    ready_s: float


class Subject:
    name = ""

    def argv(self, stack: Stack, topics: Topics, health_port: int, max_in_flight: int) -> list[str]:
        raise NotImplementedError

    def start(self, stack: Stack, *, max_in_flight: int = 1100) -> Running:
        topics = Topics.fresh()
        ensure_topics(stack.kafka.url, {}, (topics.request, topics.control, topics.dlq), PARTITIONS)
        port = local_stack.free_port()
        log = stack.workdir / f"{self.name}-{topics.group}.log"
        argv = self.argv(stack, topics, port, max_in_flight)
        began = time.perf_counter()
        with log.open("wb") as out:
            process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=out,
                                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        running = Running(name=self.name, process=process, log=log, topics=topics,
                          health_port=port, ready_s=0.0)
        try:
            wait_ready(running.alive, f"http://127.0.0.1:{running.health_port}/readyz",
                       began + READY_S, f"{running.name} was not ready within {READY_S:.0f} s",
                       running.log, poll_s=0.01)
        except BaseException:
            running.stop(drain=False)  # not left behind: a bench stops what it started
            raise
        running.ready_s = time.perf_counter() - began
        return running


class ChatActors(Subject):
    name = "chat-actors"

    def argv(self, stack: Stack, topics: Topics, health_port: int, max_in_flight: int) -> list[str]:
        config = stack.workdir / f"chat-actors-{topics.group}.toml"
        config.write_text(local_stack.stack_config(
            kafka=stack.kafka.url, redis=stack.redis.url, postgres=stack.postgres.url,
            llm_url=stack.vendor_url, sections={
                "kafka": {"request_topic": topics.request, "control_topic": topics.control,
                          "dlq_topic": topics.dlq, "group_id": topics.group,
                          "fetch_wait_max_ms": 10, "partitions": PARTITIONS},
                "llm.models.local": {"model": "openai/bench", "context_window": 8192,
                                     "max_tokens": 2048},
                "jobs": {"max_in_flight": max_in_flight, "timeout_s": 900,
                         "idle_timeout_s": 120, "first_token_timeout_s": 120},
                "health": {"port": health_port},
            }))
        return [sys.executable, "-m", "tools.cli", "run", "--config", str(config)]


class ChatActorsTraced(ChatActors):
    """chat-actors with OpenTelemetry on (otel.endpoint: a collector on loopback)."""

    name = "chat-actors+otel"

    def __init__(self) -> None:
        self.collector = Collector()

    def argv(self, stack: Stack, topics: Topics, health_port: int, max_in_flight: int) -> list[str]:
        argv = super().argv(stack, topics, health_port, max_in_flight)
        config = Path(argv[-1])
        config.write_text(config.read_text() + f'\n[otel]\nendpoint = "{self.collector.url}"\n'
                          "export_interval_s = 5\n")
        return argv


class SeedStyle(Subject):
    name = "peer"
    module = "bench.peers.seed_style"

    def argv(self, stack: Stack, topics: Topics, health_port: int, max_in_flight: int) -> list[str]:
        return [sys.executable, "-m", self.module, "--kafka", stack.kafka.url,
                "--redis", stack.redis.url, "--postgres", stack.postgres.url,
                "--llm-url", stack.vendor_url, "--model", "bench",
                "--health-port", str(health_port), "--group", topics.group,
                "--request-topic", topics.request, "--control-topic", topics.control,
                "--max-in-flight", str(max_in_flight)]


class Lean(SeedStyle):
    """The best-effort asyncio peer: the same command line as the seed-style one."""

    name = "lean"
    module = "bench.peers.lean_asyncio"


SIDES = ("chat-actors", "lean", "peer")  # the report's columns, in this order
PEERS = SIDES[1:]


# ---------------------------------------------------------------- requests and events


class Client:
    """Produces requests and cancels, and reads the events back from Redis."""

    def __init__(self, stack: Stack, running: Running) -> None:
        self.stack = stack
        self.running = running
        self.redis = stack.client
        self.producer = confluent_kafka.Producer({
            "bootstrap.servers": stack.kafka.url, "linger.ms": 2, "log.connection.close": False})

    def submit(self, count: int, tokens: int) -> list[str]:
        ids = [f"perf-{uuid.uuid4().hex[:16]}" for _ in range(count)]
        for job_id in ids:
            self.request(job_id, tokens)
        self.producer.flush(60)
        return ids

    def request(self, job_id: str, tokens: int) -> None:
        session = f"s-{job_id}"
        self.producer.produce(self.running.topics.request, key=session.encode(), value=json.dumps({
            "jobId": job_id, "userId": "perf", "sessionId": session,
            "message": "Stream the benchmark answer.", "params": {"maxTokens": tokens}}).encode())

    def cancel(self, job_id: str) -> None:
        self.producer.produce(self.running.topics.control, key=job_id.encode(), value=json.dumps({
            "type": "cancel", "jobId": job_id, "userId": "perf", "reason": "bench"}).encode())
        self.producer.flush(10)

    def wait_done(self, ids: list[str], deadline: float) -> list[str]:
        """Wait until every job's stream ends with `done`, or the deadline; return the done.

        Checks the oldest pending jobs first, a window at a time: polling every
        pending stream each round would take CPU from the worker being measured."""
        pending = list(ids)
        while pending and time.perf_counter() < deadline:
            self.running.alive()
            window = pending[:WINDOW]
            pipe = self.redis.pipeline(transaction=False)
            for job_id in window:
                pipe.xrevrange(f"sse:chat:{job_id}", count=1)
            finished = {job_id for job_id, last in zip(window, pipe.execute(), strict=True)
                        if last and last[0][1]["event"] == "done"}
            pending = [job_id for job_id in pending if job_id not in finished]
            if len(finished) < len(window) // 2:
                time.sleep(0.005)
        return [job_id for job_id in ids if job_id not in set(pending)]

    def tokens_streamed(self, ids: list[str]) -> int:
        """Tokens in the token events (the vendor's tokens are 't<i> ', one space each)."""
        total = 0
        for start in range(0, len(ids), 100):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids[start:start + 100]:
                pipe.xrange(f"sse:chat:{job_id}")
            for entries in pipe.execute():
                total += sum(json.loads(f["data"])["text"].count(" ")
                             for _, f in entries if f["event"] == "token")
        return total

    def next_event(self, job_id: str, after: str, timeout_s: float = 30) -> tuple[str, dict[str, str]]:
        key = f"sse:chat:{job_id}"
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            self.running.alive()
            reply: Any = self.redis.xread({key: after}, count=1, block=500)  # redis-py's types are loose
            for _, entries in reply or []:
                return entries[0]
        raise TimeoutError(f"{self.running.name}: no event after {after} on {key}")

    def close(self) -> None:
        self.producer.flush(10)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# ---------------------------------------------------------------- scenarios

Result = dict[str, Any]


def warm_up(client: Client) -> float:
    """Two jobs first, so one-time costs (first request, lazy imports) are not measured.
    Returns the first one's time to its first token, from its request (the worker has
    just become ready): what a cold start left for the first job."""
    job_id = f"perf-{uuid.uuid4().hex[:16]}"
    began = time.perf_counter()
    client.request(job_id, 20)
    client.producer.flush(10)
    after, event = "0-0", {"event": ""}
    while event["event"] not in ("token", "done"):
        after, event = client.next_event(job_id, after, timeout_s=120)
    first_token_ms = 1e3 * (time.perf_counter() - began)
    ids = [job_id, *client.submit(1, 20)]
    if len(client.wait_done(ids, time.perf_counter() + 120)) != 2:
        raise RuntimeError(f"{client.running.name}: warm-up jobs did not finish")
    return first_token_ms


def throughput(stack: Stack, subject: Subject, concurrency: int, sizes: Sizes,
               cap_s: float) -> Result:
    stack.pace(0.0)
    running = subject.start(stack, max_in_flight=max(concurrency + 10, 64))
    client = Client(stack, running)
    try:
        first_token_ms = warm_up(client)
        # One job alone costs milliseconds, below the 10 ms tick of process CPU time:
        # the single-stream level runs `sizes.rounds` jobs one after another.
        rounds = sizes.rounds if concurrency == 1 else 1
        cpu0, began = running.cpu_s(), time.perf_counter()
        ids: list[str] = []
        done: list[str] = []
        for _ in range(rounds):
            batch = client.submit(concurrency, sizes.answer_tokens)
            ids += batch
            done += client.wait_done(batch, began + cap_s)
        wall, cpu = time.perf_counter() - began, running.cpu_s() - cpu0
        running.stop(drain=False)
        tokens = client.tokens_streamed(ids)
    finally:
        client.close()
        running.stop(drain=False)
    return {"jobs": len(ids), "jobs_done": len(done), "tokens": tokens, "wall_s": wall,
            "capped": len(done) < len(ids), "tokens_per_s": tokens / wall,
            "cpu_us_per_token": 1e6 * cpu / max(tokens, 1), "ready_s": running.ready_s,
            "first_token_ms": first_token_ms}


def jobs_rate(stack: Stack, subject: Subject, jobs: int, cap_s: float) -> Result:
    stack.pace(0.0)
    running = subject.start(stack, max_in_flight=1000)
    client = Client(stack, running)
    try:
        first_token_ms = warm_up(client)
        cpu0, began = running.cpu_s(), time.perf_counter()
        ids = client.submit(jobs, 50)
        done = client.wait_done(ids, began + cap_s)
        wall, cpu = time.perf_counter() - began, running.cpu_s() - cpu0
    finally:
        client.close()
        running.stop(drain=False)
    return {"jobs": jobs, "jobs_done": len(done), "wall_s": wall, "capped": len(done) < jobs,
            "jobs_per_s": len(done) / wall, "cpu_ms_per_job": 1e3 * cpu / max(len(done), 1),
            "ready_s": running.ready_s,
            "first_token_ms": first_token_ms}


def latencies(stack: Stack, subject: Subject, samples: int) -> Result:
    """intake -> `started` (light load), then cancel -> `done{cancelled}` mid-stream."""
    running = subject.start(stack)
    client = Client(stack, running)
    started_ms: list[float] = []
    cancel_ms: list[float] = []
    try:
        stack.pace(0.0)
        first_token_ms = warm_up(client)
        for _ in range(samples):
            job_id = f"perf-{uuid.uuid4().hex[:16]}"
            began = time.perf_counter()
            client.request(job_id, 20)
            client.producer.flush(10)
            _, first = client.next_event(job_id, "0-0")
            if first["event"] != "started":
                raise RuntimeError(f"{running.name}: first event {first}")
            started_ms.append(1e3 * (time.perf_counter() - began))
            client.wait_done([job_id], time.perf_counter() + 30)
        stack.pace(0.02)  # 500 tokens take 10 s: cancels land mid-stream
        for _ in range(samples):
            job_id = f"perf-{uuid.uuid4().hex[:16]}"
            client.request(job_id, ANSWER_TOKENS)
            client.producer.flush(10)
            after = "0-0"
            while True:
                after, event = client.next_event(job_id, after)
                if event["event"] == "token":
                    break
            began = time.perf_counter()
            client.cancel(job_id)
            while event["event"] != "done":
                after, event = client.next_event(job_id, after)
            if json.loads(event["data"])["status"] != "cancelled":
                raise RuntimeError(f"{running.name}: cancelled job ended {event['data']}")
            cancel_ms.append(1e3 * (time.perf_counter() - began))
    finally:
        stack.pace(0.0)
        client.close()
        running.stop(drain=False)
    return {"samples": samples, "started_p50_ms": percentile(started_ms, 50),
            "started_p99_ms": percentile(started_ms, 99),
            "cancel_p50_ms": percentile(cancel_ms, 50), "cancel_p99_ms": percentile(cancel_ms, 99),
            "ready_s": running.ready_s,
            "first_token_ms": first_token_ms}


def memory(stack: Stack, subject: Subject, streams: int, cap_s: float) -> Result:
    """RSS per in-flight stream: slow streams (a token a second) held open at once."""
    running = subject.start(stack, max_in_flight=streams + 16)
    client = Client(stack, running)
    try:
        first_token_ms = warm_up(client)
        stack.pace(1.0)
        idle = running.rss()
        began = time.perf_counter()
        client.submit(streams, ANSWER_TOKENS)
        active = 0
        while time.perf_counter() - began < cap_s:
            running.alive()
            active = stack.active_streams()
            if active >= streams:
                break
            time.sleep(0.25)
        time.sleep(2.0)  # every stream has received tokens and built its state
        active = stack.active_streams()
        loaded = running.rss()
    finally:
        client.close()
        running.stop(drain=False)
        stack.pace(0.0)
    settle = time.perf_counter() + 60
    while stack.active_streams() and time.perf_counter() < settle:  # the vendor hangs up
        time.sleep(0.2)
    return {"streams": streams, "in_flight": active, "capped": active < streams,
            "idle_rss_mb": idle / 2**20, "loaded_rss_mb": loaded / 2**20,
            "kb_per_stream": (loaded - idle) / 1024 / max(active, 1), "ready_s": running.ready_s,
            "first_token_ms": first_token_ms}


# ---------------------------------------------------------------- the report

HIGHER_IS_BETTER = {"tokens_per_s", "jobs_per_s"}  # every other metric: lower is better


def better(metric: str) -> str:
    return "higher" if metric in HIGHER_IS_BETTER else "lower"


def rows(sizes: Sizes) -> list[tuple[str, str, str, str, str]]:
    """The table: (scenario key, metric, label, better: "lower" | "higher", format)."""
    table = [
        *[(f"throughput_{n}", "tokens_per_s", f"tokens/s, {n} concurrent x {sizes.answer_tokens}",
           ",.0f") for n in sizes.levels],
        *[(f"throughput_{n}", "cpu_us_per_token", f"worker CPU us/token, {n} concurrent", ",.1f")
          for n in sizes.levels],
        ("jobs", "jobs_per_s", f"jobs/s, {sizes.jobs:,} jobs x 50 tokens", ",.0f"),
        ("jobs", "cpu_ms_per_job", "worker CPU ms/job", ",.2f"),
        ("latency", "started_p50_ms", "intake -> started p50 ms", ",.1f"),
        ("latency", "started_p99_ms", "intake -> started p99 ms", ",.1f"),
        ("latency", "cancel_p50_ms", "cancel -> done p50 ms", ",.1f"),
        ("latency", "cancel_p99_ms", "cancel -> done p99 ms", ",.1f"),
        *[(f"memory_{n}", "kb_per_stream", f"RSS KB per stream, {n:,} streams", ",.1f")
          for n in sizes.streams],
        ("cold_start", "median_s", "cold start s (process -> ready)", ",.2f"),
        ("cold_start", "first_token_ms", "first job after ready: first token ms", ",.0f"),
        ("dev", "first_token_s", f"{'second ' if sizes.dev_runs > 1 else ''}`dev --once`: "
                                 "first token s", ",.2f"),
    ]
    return [(scenario, metric, label, better(metric), fmt)
            for scenario, metric, label, fmt in table]

# (label, scenario, metric, test on chat-actors' value, test on its ratio to `against`, against):
# "lean" is the best-effort peer, "best" whichever peer did best on the metric.
Goal = tuple[str, str, str, Callable[[float], bool] | None, Callable[[float], bool] | None, str]
GOALS: list[Goal] = [
    ("CPU <= 3 us/token at 200 streams, >= 3x lean", "throughput_200", "cpu_us_per_token",
     lambda v: v <= 3, lambda r: r >= 3, "lean"),
    ("CPU <= 0.5 ms/job, >= 3x lean", "jobs", "cpu_ms_per_job",
     lambda v: v <= 0.5, lambda r: r >= 3, "lean"),
    ("intake -> started p99 no worse than best peer", "latency", "started_p99_ms",
     None, lambda r: r >= 1, "best"),
    ("cancel -> done p99 no worse than best peer", "latency", "cancel_p99_ms",
     None, lambda r: r >= 1, "best"),
    ("cold start <= 1.5 s", "cold_start", "median_s", lambda v: v <= 1.5, None, "best"),
    ("second dev --once: first token <= 6 s", "dev", "first_token_s", lambda v: v <= 6, None,
     "best"),
    ("<= 30 KB RSS per stream at 5,000 streams", "memory_5000", "kb_per_stream",
     lambda v: v <= 30, None, "best"),
]


def ratio(ours: float | None, peer: float | None, better: str) -> float | None:
    if ours is None or peer is None or ours <= 0 or peer <= 0:
        return None
    return peer / ours if better == "lower" else ours / peer


def report(results: dict[str, dict[str, Result]], sizes: Sizes,
           ) -> tuple[str, list[dict[str, Any]]]:
    def value(name: str, scenario: str, metric: str) -> float | None:
        return results.get(name, {}).get(scenario, {}).get(metric)

    def capped(name: str, scenario: str) -> str:
        return "*" if results.get(name, {}).get(scenario, {}).get("capped") else " "

    sides = [name for name in SIDES if name in results]
    peers = [name for name in PEERS if name in results] if "chat-actors" in results else []
    lines = [f"{'':44} " + " ".join(f"{name:>13}" for name in sides)
             + "".join(f" {'vs ' + name:>9}" for name in peers)]
    table = rows(sizes)
    for scenario, metric, label, higher_or_lower, fmt in table:
        values = {name: value(name, scenario, metric) for name in sides}
        if all(v is None for v in values.values()):
            continue
        cells = [f"{v:{fmt}}{capped(n, scenario)}" if v is not None else "-"
                 for n, v in values.items()]
        ratios = [ratio(values["chat-actors"], values[name], higher_or_lower) for name in peers]
        lines.append(f"{label:44} " + " ".join(f"{c:>13}" for c in cells)
                     + "".join(f" {(f'{r:,.1f}x' if r is not None else '-'):>9}" for r in ratios))
    lines.append("* capped: not every job finished within --cap-s; measured over that window")
    if "chat-actors+otel" in results:
        lines += ["", f"{'OpenTelemetry on vs off':44} {'off':>13} {'on':>13} {'cost':>9}"]
        for scenario, metric, label, higher_or_lower, fmt in table:
            off, on = value("chat-actors", scenario, metric), value("chat-actors+otel", scenario,
                                                                     metric)
            if off is None or on is None:
                continue
            r = ratio(off, on, higher_or_lower)  # how much better off is than on: the cost of tracing
            lines.append(f"{label:44} {off:>13{fmt}} {on:>13{fmt}} "
                         f"{(f'{r:,.2f}x' if r is not None else '-'):>9}")
    goals = []
    lines.append("")
    for label, scenario, metric, on_value, on_ratio, against in GOALS:
        ours = value("chat-actors", scenario, metric)
        ratios = {name: ratio(ours, value(name, scenario, metric), better(metric))
                  for name in PEERS}
        known = [x for x in ratios.values() if x is not None]
        r = ratios.get(against) if against != "best" else (min(known) if known else None)
        met = ours is not None and (on_value is None or on_value(ours)) and \
            (on_ratio is None or (r is not None and on_ratio(r)))
        goals.append({"goal": label, "value": ours, "ratio": r, "ratios": ratios, "met": met})
        shown = "-" if ours is None else f"{ours:,.2f}" + "".join(
            f", {x:,.1f}x {name}" for name, x in ratios.items() if x is not None)
        lines.append(f"  {'met    ' if met else 'NOT MET'}  {label:45} {shown}")
    return "\n".join(lines), goals


SCENARIOS = ("throughput", "jobs", "latency", "memory", "dev")


def dev_once(runs: int) -> Result:
    """`bin/chat-actors dev --once` (its own stack and SmolLM2) `runs` times: the wall time
    from the command to the first byte of the answer, for the newcomer's last run (the
    first one may still be filling caches).

    It runs what bin/chat-actors runs once its venv is the lock, with this interpreter:
    the wrapper itself (a few milliseconds) would sync .venv if it were not the lock,
    minutes in the middle of a benchmark, and in another venv than the one measured."""
    firsts: list[float] = []
    for _ in range(runs):
        began = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "tools.cli", "dev", "--once",
                                    "Why is the sky blue?"], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            assert process.stdout is not None
            first = process.stdout.read(1)
            firsts.append(time.perf_counter() - began)
            process.stdout.read()
            if process.wait(120) != 0 or not first:
                raise RuntimeError(f"dev --once failed with {process.returncode}")
        finally:
            # SIGTERM, as Ctrl-C: dev stops the stack it started before it exits.
            local_stack.terminate(process, signal.SIGTERM, 30)
    return {"runs": runs, "first_token_s": firsts[-1], "all_s": firsts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-actors bench perf",
                                     description=(__doc__ or "").split("\n\n")[0])
    result_options(parser, "perf", f"every scenario on every side, smaller: throughput at "
                   f"{' and '.join(map(str, QUICK.levels))} streams of {QUICK.answer_tokens} "
                   f"tokens, {QUICK.jobs} jobs, {QUICK.samples} latency samples, "
                   f"{QUICK.streams[0]:,} held streams, one `dev --once`, --cap-s "
                   f"{QUICK.cap_s:g} (about 2 minutes)")
    parser.add_argument("--only", choices=SIDES, help="run one side")
    parser.add_argument("--otel", action="store_true",
                        help="also run chat-actors with OpenTelemetry on (a loopback collector)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--cap-s", type=float,
                        help=f"longest a throughput scenario may run; jobs 2x, memory 3x "
                             f"(default {FULL.cap_s:g}, --quick {QUICK.cap_s:g})")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; have {', '.join(SCENARIOS)}")
    sizes = QUICK if args.quick else FULL
    cap_s = sizes.cap_s if args.cap_s is None else args.cap_s
    if cap_s <= 0:
        parser.error("--cap-s must be positive")
    subjects: list[Subject] = [s for s in (ChatActors(), Lean(), SeedStyle())
                               if args.only in (None, s.name)]
    if args.otel:
        subjects.append(ChatActorsTraced())
    results: dict[str, dict[str, Result]] = {s.name: {} for s in subjects}
    began = time.perf_counter()

    def step(subject: Subject, key: str, run: Callable[[], Result]) -> None:
        print(f"  {subject.name}: {key} ...", end="", flush=True)
        t = time.perf_counter()
        results[subject.name][key] = result = run()
        print(f" {time.perf_counter() - t:.0f} s", flush=True)
        if "ready_s" in result:
            starts = results[subject.name].setdefault("_ready", {"samples": [], "first": []})
            starts["samples"].append(result["ready_s"])
            starts["first"].append(result["first_token_ms"])

    with open_stack() as stack:
        print(f"stack ready; vendor {stack.vendor_url}", flush=True)
        for subject in subjects:
            if "throughput" in chosen:
                for n in sizes.levels:
                    step(subject, f"throughput_{n}", lambda s=subject, n=n: throughput(
                        stack, s, n, sizes, cap_s))
            if "jobs" in chosen:
                step(subject, "jobs", lambda s=subject: jobs_rate(stack, s, sizes.jobs,
                                                                  cap_s * 2))
            if "latency" in chosen:
                step(subject, "latency", lambda s=subject: latencies(stack, s, sizes.samples))
            if "memory" in chosen:
                for n in sizes.streams:
                    step(subject, f"memory_{n}", lambda s=subject, n=n: memory(
                        stack, s, n, cap_s * 3))
            if "dev" in chosen and subject.name == "chat-actors":
                step(subject, "dev", lambda: dev_once(sizes.dev_runs))
    for scenarios in results.values():
        ready = scenarios.pop("_ready", {"samples": [], "first": []})
        starts = ready["samples"]
        if starts:
            scenarios["cold_start"] = {"median_s": statistics.median(starts), "max_s": max(starts),
                                       "samples": len(starts),
                                       "first_token_ms": statistics.median(ready["first"])}
    table, goals = report(results, sizes)
    total = time.perf_counter() - began
    print(f"\nchat-actors vs its peers ({total / 60:.1f} min; {machine()['cpu']}, "
          f"{os.cpu_count()} cores)\n")
    print(table)
    write_result(args.json, quick=args.quick, wall_s=total, results=results, goals=goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
