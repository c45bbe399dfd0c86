"""Our front door against LiteLLM Proxy: streaming chat completions, one vendor, one run.

The same scripted vendor (bench/paced_vendor.py: a fixed answer of `--tokens` tokens,
one every `--token-ms`, the first one that long after the request) is reached three ways
in one run: **direct** (the vendor itself), through **chat-actors**' front door (`POST
/v1/chat/completions` on `bin/chat-actors gateway`, a JWT; the job goes through the broker
to `--workers` workers, `chat-actors run`, and back through Redis, on the embedded local
stack: Tansu, Redis, Postgres), and through **LiteLLM Proxy** (`litellm --config`, a
config.yaml whose model_list points at the vendor, a master key, no database, offline:
LITELLM_LOCAL_MODEL_COST_MAP, telemetry off; `--litellm-workers` uvicorn workers, by
default one per core as LiteLLM's production guide says). Each side in turn gets the same
load from the same generator, a process of its own (bench/openai_load.py), at each
`--streams` level of concurrent streaming completions: a closed loop, each stream's next
request as soon as its answer ends.

Per level and side: time to first token (p50/p99; "added" is the side's figure minus the
direct call's at the same level), tokens/s, and CPU per streamed token: the user+system
time of every process of the side over the window (psutil, children included), divided by
the tokens the clients got in it. Ours: the gateway, the worker(s), the broker, Redis and
Postgres (every backend); LiteLLM Proxy: its processes (it needs nothing else without a
database). The vendor's own CPU is the same for every side and counted on none (shown
apart). Then a ramp on each proxy side (`--ramp`, concurrent streams, rising) until a step
whose p99 time to first token passes 1 s or that loses a request: the highest load held.

    bin/chat-actors bench frontdoor                        # 1, 100, 1,000 streams, then the ramps
    bin/chat-actors bench frontdoor --streams 1,100 --seconds 10 --ramp ""
    bin/chat-actors bench frontdoor --quick                # a smoke run, about 90 s

Prints one table and issue 40's goals, and writes them as JSON (`--json`, default
bench/results/frontdoor.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import psutil

from actors.adapters.kafka import ensure_topics
from bench import machine, result_options, wait_ready, write_result
from tools import local_stack

ROOT = Path(__file__).resolve().parent.parent
USER = "bench-user"
MODEL = "bench"
SECRET_ENV = "CHAT_ACTORS_JWT_SECRET"
PARTITIONS = 4
HELD_MS = 1000.0  # a ramp step holds when its p99 time to first token is under this
READY_S = 120.0
SIDES = ("direct", "chat-actors", "litellm")
PROXIES = SIDES[1:]
QUICK_STREAMS, QUICK_SECONDS, QUICK_RAMP = (1, 10), 2.0, (10,)


@dataclass(frozen=True)
class Answer:
    tokens: int
    token_ms: float

    @property
    def seconds(self) -> float:
        return self.tokens * self.token_ms / 1000


# ---------------------------------------------------------------- processes and their CPU


def tree_cpu(process: psutil.Process) -> float:
    """User+system seconds of a process and every process under it, the ones it has
    reaped included (Postgres's backends that ended, uvicorn's workers)."""
    total = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        for each in (process, *process.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess):
                t = each.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


@dataclass
class Started:
    """A process this run started: stopped on the way out, its log kept for a failure."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.process.returncode}): "
                               f"{local_stack.last_words(self.log, lines=6)}")

    def stop(self) -> None:
        local_stack.terminate(self.process, signal.SIGTERM, 30)


def spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None
          ) -> Started:
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=out,
                                   stdin=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return Started(name, process, log)


@dataclass
class Side:
    """What the load generator calls, and the processes whose CPU is the side's."""

    name: str
    url: str  # the chat completions URL
    key: str  # the Bearer token
    processes: dict[str, psutil.Process]  # by the name the report shows
    started: list[Started] = field(default_factory=list[Started])

    def cpu(self) -> dict[str, float]:
        return {name: tree_cpu(process) for name, process in self.processes.items()}

    def alive(self) -> None:
        for each in self.started:
            each.alive()

    def stop(self) -> None:
        for each in reversed(self.started):
            each.stop()


def settle(side: Side, least_s: float = 4.0, quiet_core: float = 0.25, most_s: float = 60.0
           ) -> tuple[float, float]:
    """Wait until the side's processes are idle (under `quiet_core` of a core for a second),
    at least `least_s`: work a process starts once ready (our worker loads LiteLLM after
    2 s without a job; the broker settles its consumer group) is not the load's. Returns
    the seconds waited and the cores used in the last second (the side's idle floor)."""
    began = time.perf_counter()
    if not side.processes:
        return 0.0, 0.0
    last, used = sum(side.cpu().values()), 0.0
    while time.perf_counter() - began < most_s:
        time.sleep(1.0)
        side.alive()
        now = sum(side.cpu().values())
        used, last = now - last, now
        if time.perf_counter() - began >= least_s and used < quiet_core:
            break
    return time.perf_counter() - began, used


def _ready(started: Started, url: str) -> None:
    try:
        wait_ready(started.alive, url, time.perf_counter() + READY_S,
                   f"{started.name} was not ready within {READY_S:.0f} s", started.log, 0.1)
    except BaseException:
        started.stop()
        raise


@dataclass
class Stack:
    kafka: local_stack.Service
    redis: local_stack.Service
    postgres: local_stack.Service
    vendor: Started
    vendor_url: str
    workdir: Path

    def direct(self) -> Side:
        return Side("direct", f"{self.vendor_url}/chat/completions", "sk-direct", {})

    def chat_actors(self, workers: int, max_streams: int) -> Side:
        """The worker(s) and the gateway on this stack, fresh topics; a JWT for USER."""
        tag = uuid.uuid4().hex[:8]
        topics = {"request_topic": f"frontdoor.{tag}.request",
                  "control_topic": f"frontdoor.{tag}.control",
                  "dlq_topic": f"frontdoor.{tag}.dlq"}
        ensure_topics(self.kafka.url, {}, list(topics.values()), PARTITIONS)
        port = local_stack.free_port()
        secret = secrets.token_urlsafe(32)

        def config(name: str, health_port: int) -> Path:
            path = self.workdir / f"{name}.toml"
            path.write_text(local_stack.stack_config(
                kafka=self.kafka.url, redis=self.redis.url, postgres=self.postgres.url,
                llm_url=self.vendor_url, sections={
                    "kafka": {**topics, "group_id": f"frontdoor-{tag}",
                              "partitions": PARTITIONS},
                    "llm": {"default_model": MODEL},
                    f"llm.models.{MODEL}": {"model": f"openai/{MODEL}",
                                            "api_base": self.vendor_url,
                                            "context_window": 8192, "max_tokens": 2048},
                    "jobs": {"max_in_flight": max_streams + 64, "timeout_s": 600,
                             "first_token_timeout_s": 120, "idle_timeout_s": 120},
                    "health": {"port": health_port},
                    # One user holds every stream: the cap on a user's streams is not measured.
                    "gateway": {"host": "127.0.0.1", "port": port, "dev_signin": False,
                                "page": False, "max_streams_per_user": 100_000},
                }))
            return path

        side = Side("chat-actors", f"http://127.0.0.1:{port}/v1/chat/completions",
                    jwt.encode({"sub": USER, "exp": int(time.time()) + 86400}, secret,
                               algorithm="HS256"),
                    {"kafka": psutil.Process(self.kafka.pid), "redis": psutil.Process(
                        self.redis.pid), "postgres": psutil.Process(self.postgres.pid)})
        try:
            for n in range(workers):  # one after another: the first one migrates
                health = local_stack.free_port()
                name = f"worker-{n + 1}" if workers > 1 else "worker"
                worker = spawn(name, [sys.executable, "-m", "tools.cli", "run", "--config",
                                      str(config(name, health))], self.workdir)
                side.started.append(worker)
                _ready(worker, f"http://127.0.0.1:{health}/readyz")
                side.processes[name] = psutil.Process(worker.process.pid)
            gateway = spawn("gateway", [sys.executable, "-m", "tools.cli", "gateway", "--config",
                                        str(config("gateway", 0))], self.workdir,
                            {SECRET_ENV: secret})
            side.started.append(gateway)
            _ready(gateway, f"http://127.0.0.1:{port}/readyz")
            side.processes = {"gateway": psutil.Process(gateway.process.pid), **side.processes}
        except BaseException:
            side.stop()
            raise
        return side

    def litellm(self, workers: int) -> Side:
        """LiteLLM Proxy as its docs run it: `litellm --config config.yaml`, a model_list
        entry for the vendor, a master key, no database; offline; access log off."""
        port = local_stack.free_port()
        key = "sk-bench-" + secrets.token_hex(16)
        config = self.workdir / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL}\n"
            f"      api_base: {self.vendor_url}\n"
            "      api_key: sk-vendor\n"
            "general_settings:\n"
            f"  master_key: {key}\n"
            "litellm_settings:\n"
            "  telemetry: false\n")
        # Its uvicorn access log would be a line per request: off, as ours writes none.
        log_config = self.workdir / "litellm-logging.json"
        log_config.write_text(json.dumps({
            "version": 1, "disable_existing_loggers": False,
            "loggers": {"uvicorn.access": {"level": "WARNING"}}}))
        litellm = Path(sys.executable).with_name("litellm")
        started = spawn("litellm", [str(litellm), "--config", str(config), "--host", "127.0.0.1",
                                    "--port", str(port), "--num_workers", str(workers),
                                    "--log_config", str(log_config)], self.workdir,
                        {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                         "LITELLM_TELEMETRY": "False"})
        _ready(started, f"http://127.0.0.1:{port}/health/liveliness")
        return Side("litellm", f"http://127.0.0.1:{port}/v1/chat/completions", key,
                    {"litellm": psutil.Process(started.process.pid)}, [started])


@contextlib.contextmanager
def open_stack(token_ms: float) -> Iterator[Stack]:
    with local_stack.workdir("chat-actors-bench-frontdoor-") as workdir:
        kafka, rds, pg = local_stack.start_core(workdir)
        vendor: Started | None = None
        try:
            log = workdir / "vendor.log"
            process = subprocess.Popen(
                [sys.executable, "-m", "bench.paced_vendor", "--port", "0", "--token-ms",
                 str(token_ms)], cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("wb"),
                env={**os.environ, "PYTHONPATH": str(ROOT)})
            vendor = Started("vendor", process, log)
            assert process.stdout is not None
            url = process.stdout.readline().decode().strip()
            if not url.startswith("http"):
                raise RuntimeError(f"the vendor did not start: {local_stack.last_words(log)}")
            yield Stack(kafka, rds, pg, vendor, url, workdir)
        finally:
            if vendor is not None:
                vendor.stop()
            for service in (pg, rds, kafka):
                service.stop()


# ---------------------------------------------------------------- one load


Result = dict[str, Any]


def load(stack: Stack, side: Side, streams: int, answer: Answer, seconds: float) -> Result:
    """`streams` concurrent completions on `side` from the generator's process: what it
    measured, and the CPU of the side's processes (and the vendor's) over its window."""
    argv = [sys.executable, "-m", "bench.openai_load", "--url", side.url, "--key", side.key,
            "--model", MODEL, "--streams", str(streams), "--tokens", str(answer.tokens),
            "--answer-s", f"{answer.seconds:g}", "--warm-s", f"{answer.seconds + 1:g}",
            "--seconds", f"{seconds:g}"]
    client = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    vendor = psutil.Process(stack.vendor.process.pid)
    try:
        assert client.stdout is not None

        def phase(name: str) -> dict[str, Any]:
            line = client.stdout.readline() if client.stdout else ""
            if not line:
                side.alive()
                raise RuntimeError(f"the load generator stopped ({client.wait()}) before "
                                   f"{name!r}")
            said = json.loads(line)
            if said.get("phase") != name:
                raise RuntimeError(f"the load generator said {said}, not {name!r}")
            return said

        phase("window")
        cpu0, vendor0, began = side.cpu(), tree_cpu(vendor), time.perf_counter()
        phase("closed")
        cpu1, vendor1, window = side.cpu(), tree_cpu(vendor), time.perf_counter() - began
        result = phase("done")
        client.wait(30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    side.alive()
    tokens = max(result["tokens"], 1)
    cpu = {name: cpu1[name] - cpu0[name] for name in cpu0}
    result.pop("phase")
    return {**result, "window_s": window, "tokens_per_s": result["tokens"] / window,
            "cpu_s": sum(cpu.values()), "cpu_us_per_token": 1e6 * sum(cpu.values()) / tokens,
            "cpu_us_per_token_by_process": {n: 1e6 * c / tokens for n, c in cpu.items()},
            "vendor_cpu_us_per_token": 1e6 * (vendor1 - vendor0) / tokens}


def held(step: Result) -> bool:
    return (step["requests"] > 0 and step["ttft_p99_ms"] is not None
            and step["ttft_p99_ms"] < HELD_MS and not step["errors"]
            and not step["incomplete"] and not step["unfinished"])


def ramp(stack: Stack, side: Side, steps: Sequence[int], answer: Answer, seconds: float,
         say: Callable[[str], None]) -> Result:
    """Each step until one does not hold: the highest that did."""
    done: dict[str, Result] = {}
    for streams in steps:
        step = done[str(streams)] = load(stack, side, streams, answer, seconds)
        say(f"    ramp {streams:>5} streams: p99 {_ms(step['ttft_p99_ms'])}, "
            f"{step['errors']} errors, {step['incomplete']} incomplete")
        if not held(step):
            break
    return {"steps": done, "held_streams": max(
        (int(n) for n, step in done.items() if held(step)), default=0)}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


# ---------------------------------------------------------------- the report


def added(results: dict[str, Result], side: str, level: str, q: str) -> float | None:
    ours, direct = (results.get(name, {}).get(level, {}).get(f"ttft_{q}_ms")
                    for name in (side, "direct"))
    return None if ours is None or direct is None else ours - direct


def goals(results: dict[str, Result], levels: Sequence[int]) -> list[dict[str, Any]]:
    """Issue 40's three, each met or not with the figures that decide it."""
    found: list[dict[str, Any]] = []
    ours, theirs = added(results, "chat-actors", "streams_100", "p99"), added(
        results, "litellm", "streams_100", "p99")
    found.append({"goal": "added TTFT p99 at 100 streams no worse than LiteLLM Proxy's",
                  "chat-actors": ours, "litellm": theirs,
                  "met": ours is not None and theirs is not None and ours <= theirs})
    ratios = {}
    for n in levels:
        a, b = (results.get(s, {}).get(f"streams_{n}", {}).get("cpu_us_per_token")
                for s in PROXIES)
        ratios[str(n)] = None if not a or not b else b / a
    found.append({"goal": "CPU per streamed token at least 3x lower than LiteLLM Proxy's "
                          "(every level)", "ratios": ratios,
                  "met": bool(ratios) and all(r is not None and r >= 3 for r in ratios.values())})
    ours_held, theirs_held = (results.get(s, {}).get("ramp", {}).get("held_streams")
                              for s in PROXIES)
    found.append({"goal": f"a higher load held (ramp: p99 TTFT under {HELD_MS / 1000:g} s, "
                          "no request lost)", "chat-actors": ours_held, "litellm": theirs_held,
                  "met": ours_held is not None and theirs_held is not None
                  and ours_held > theirs_held})
    return found


def report(results: dict[str, Result], levels: Sequence[int], found: list[dict[str, Any]]
           ) -> str:
    sides = [s for s in SIDES if s in results]
    lines = [f"{'':46}" + "".join(f"{s:>14}" for s in sides) + f"{'vs LiteLLM':>12}"]

    def row(label: str, values: dict[str, float | None], fmt: str, better: str = "") -> None:
        cells = "".join(f"{(format(values[s], fmt) if values.get(s) is not None else '-'):>14}"
                        for s in sides)
        ours, theirs = values.get("chat-actors"), values.get("litellm")
        ratio = "-"
        if better and ours and theirs and ours > 0 and theirs > 0:
            ratio = f"{(theirs / ours if better == 'lower' else ours / theirs):,.1f}x"
        lines.append(f"{label:46}{cells}{ratio:>12}")

    for n in levels:
        level = f"streams_{n}"
        at = {s: results.get(s, {}).get(level, {}) for s in SIDES}
        title = f"{n:,} stream{'s' if n > 1 else ''}"
        row(f"{title}: TTFT p50 ms", {s: at[s].get("ttft_p50_ms") for s in sides}, ",.1f")
        row(f"{title}: TTFT p99 ms", {s: at[s].get("ttft_p99_ms") for s in sides}, ",.1f")
        row(f"{title}: added TTFT p50 ms", {s: added(results, s, level, "p50")
                                            for s in PROXIES}, ",.1f", "lower")
        row(f"{title}: added TTFT p99 ms", {s: added(results, s, level, "p99")
                                            for s in PROXIES}, ",.1f", "lower")
        row(f"{title}: tokens/s", {s: at[s].get("tokens_per_s") for s in sides}, ",.0f",
            "higher")
        row(f"{title}: CPU us per token", {s: at[s].get("cpu_us_per_token") for s in PROXIES},
            ",.1f", "lower")
        row(f"{title}: requests / lost", {s: at[s].get("requests") for s in sides}, ",.0f")
        lost = [f"{s} {at[s][kind]} {kind}" for s in sides for kind in (
            "errors", "incomplete", "unfinished") if at[s].get(kind)]
        if lost:  # (unfinished: still streaming when the drain after the window gave up)
            lines[-1] += "   lost: " + ", ".join(lost)
    if any("ramp" in results.get(s, {}) for s in PROXIES):
        row(f"ramp: most streams held (p99 TTFT < {HELD_MS / 1000:g} s)",
            {s: results.get(s, {}).get("ramp", {}).get("held_streams") for s in PROXIES},
            ",.0f", "higher")
    ours = results.get("chat-actors", {})
    if any(f"streams_{n}" in ours for n in levels):
        names = list(ours[next(f"streams_{n}" for n in levels if f"streams_{n}" in ours)]
                     ["cpu_us_per_token_by_process"])
        lines += ["", "chat-actors' CPU us per token, by process:",
                  f"{'':14}" + "".join(f"{name:>11}" for name in names)]
        for n in levels:
            by = ours.get(f"streams_{n}", {}).get("cpu_us_per_token_by_process")
            if by:
                lines.append(f"{f'{n:,} streams':14}" + "".join(f"{by[x]:>11,.1f}" for x in names))
    vendor = {s: results[s].get(f"streams_{levels[-1]}", {}).get("vendor_cpu_us_per_token")
              for s in sides}
    lines += ["", "the vendor's own CPU us per token (counted on no side), "
              f"{levels[-1]:,} streams: " + ", ".join(f"{s} {v:,.1f}" for s, v in vendor.items()
                                                      if v is not None), ""]
    for goal in found:
        shown = {k: v for k, v in goal.items() if k not in ("goal", "met")}
        lines.append(f"  {'met    ' if goal['met'] else 'NOT MET'}  {goal['goal']}: "
                     + json.dumps(shown, default=lambda v: round(v, 1)))
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def _numbers(parser: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{flag}: comma-separated whole numbers, not {text!r}")
    if any(v < 1 for v in values) or values != sorted(set(values)):
        parser.error(f"{flag}: positive, rising, each once")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-actors bench frontdoor",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--streams", default="1,100,1000",
                        help="concurrent streaming completions, one level each (1,100,1000)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="each level's measured window, after a warm-up of one answer")
    parser.add_argument("--ramp", default="10,25,50,100,150,200,300,400,600,800,1000",
                        help="concurrent streams, rising, on each proxy until one does not "
                             "hold; empty: no ramp")
    parser.add_argument("--ramp-seconds", type=float, default=10.0, help="each ramp step's window")
    parser.add_argument("--tokens", type=int, default=100, help="tokens in the vendor's answer")
    parser.add_argument("--token-ms", type=float, default=50.0,
                        help="the vendor's time to the first token and between tokens")
    parser.add_argument("--workers", type=int, default=1, help="chat-actors workers (1)")
    parser.add_argument("--litellm-workers", type=int, default=os.cpu_count() or 1,
                        help="LiteLLM Proxy's --num_workers (default: one per core)")
    parser.add_argument("--only", choices=PROXIES, help="one proxy side (the direct call runs too)")
    result_options(parser, "frontdoor", f"{' and '.join(map(str, QUICK_STREAMS))} streams, "
                   f"{QUICK_SECONDS:g} s windows, one ramp step, 20-token answers (about 90 s, "
                   "a third of it LiteLLM Proxy's start)")
    args = parser.parse_args(argv)
    levels = _numbers(parser, "--streams", args.streams)
    steps = _numbers(parser, "--ramp", args.ramp)
    answer = Answer(args.tokens, args.token_ms)
    if args.quick:
        levels, steps = list(QUICK_STREAMS), list(QUICK_RAMP)
        args.seconds = args.ramp_seconds = QUICK_SECONDS
        answer = Answer(20, 25.0)
    if not levels or args.seconds <= 0 or args.ramp_seconds <= 0 or answer.tokens < 1 \
            or answer.token_ms <= 0 or args.workers < 1 or args.litellm_workers < 1:
        parser.error("--streams, --seconds, --tokens, --token-ms and the worker counts must "
                     "be positive")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # inherited by every process
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results: dict[str, Result] = {}
    began = time.perf_counter()
    most = max([*levels, *steps])

    def say(line: str) -> None:
        print(line, flush=True)

    with open_stack(answer.token_ms) as stack:
        say(f"stack and vendor up ({answer.tokens} tokens every {answer.token_ms:g} ms, "
            f"{answer.seconds:g} s an answer)")
        starts: dict[str, Callable[[], Side]] = {
            "direct": stack.direct,
            "chat-actors": lambda: stack.chat_actors(args.workers, most),
            "litellm": lambda: stack.litellm(args.litellm_workers)}
        for name, start in starts.items():
            if args.only not in (None, name) and name != "direct":
                continue
            t = time.perf_counter()
            side = start()
            results[name] = {}
            try:
                ready_s = time.perf_counter() - t
                waited, idle = settle(side)
                results[name]["ready_s"], results[name]["idle_cores"] = ready_s, idle
                say(f"  {name}: ready in {ready_s:.1f} s, idle {waited:.0f} s later "
                    f"({100 * idle:.0f}% of a core)")
                for n in levels:
                    measured = results[name][f"streams_{n}"] = load(stack, side, n, answer,
                                                                    args.seconds)
                    say(f"    {n:>5} streams: TTFT p50 {_ms(measured['ttft_p50_ms'])}, p99 "
                        f"{_ms(measured['ttft_p99_ms'])}, {measured['tokens_per_s']:,.0f} "
                        f"tokens/s, {measured['cpu_us_per_token']:,.1f} us CPU per token")
                if steps and name != "direct":
                    results[name]["ramp"] = ramp(stack, side, steps, answer, args.ramp_seconds,
                                                 say)
            finally:
                side.stop()
    found = goals(results, levels)
    total = time.perf_counter() - began
    say(f"\nstreaming chat completions: direct, chat-actors' front door ({args.workers} "
        f"worker{'s' if args.workers > 1 else ''}), LiteLLM Proxy ({args.litellm_workers} "
        f"worker{'s' if args.litellm_workers > 1 else ''}); {total / 60:.1f} min; "
        f"{machine()['cpu']}, {os.cpu_count()} cores\n")
    say(report(results, levels, found))
    write_result(args.json, quick=args.quick, wall_s=total, streams=levels, ramp=steps,
                 seconds=args.seconds, ramp_seconds=args.ramp_seconds,
                 answer={"tokens": answer.tokens, "token_ms": answer.token_ms},
                 workers=args.workers, litellm_workers=args.litellm_workers, results=results,
                 goals=found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
