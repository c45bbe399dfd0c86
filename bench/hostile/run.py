"""The hostile-client run (issue 35): `bin/chat-actors bench chaos --gateway`.

One local stack (Tansu, Redis, Postgres), a scripted vendor (tokens with small
delays), one worker (`chat-actors run`) and one gateway (`chat-actors gateway`, HS256
tokens), then two phases on them, each with 50 honest users streaming through the
gateway (bench/hostile/honest.py):

  A  the honest users alone;
  B  the same, while hostile users (bench/hostile/attacks.py) send forged and huge
     `Last-Event-ID`s on their own jobs, 400 MB bodies, slowloris bodies, tool-schema
     bombs, PDF bombs, bursts of event requests for unknown jobs, and retries across
     a broker frozen (SIGSTOP) for longer than the gateway's produce timeout.

The honest and the hostile users are two client processes beside the servers; the
hostile one runs at nice 10 (an attacker's own CPU is not the gateway's to pay).
Per phase: the honest users' events missed (entries in the job's Redis stream they
never received, and turns that never got their `done`), their XADD -> client p50
and p99, the gateway's and the worker's peak RSS, logical requests run twice (the
vendor answered them more than once, or two jobs ran them), and exits of the worker
and the gateway. Then the issue's bars, PASS or FAIL each. Loopback only; bounded in
count and time; every process it starts is stopped on every way out.

    bin/chat-actors bench chaos --gateway            # about 5 minutes on 2 cores
    bin/chat-actors bench chaos --gateway --quick    # a smoke run, about 1.5 minutes

It writes what it prints as JSON (`--json`, default bench/results/chaos-gateway.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import psycopg
import redis

from actors.adapters.kafka import ensure_topics
from bench import RESULTS, write_result
from bench.hostile.clients import grace_s
from bench.hostile.plan import Plan
from bench.hostile.processes import ROOT, RSS_CAP, Managed, Watch, gateway_ready, worker_ready
from bench.hostile.report import Phase, bars, print_report
from bench.perf import percentile
from tests.scripted_llm import Call, Reply, ScriptedLLM
from tools import local_stack

SECRET_ENV = "CHAT_ACTORS_JWT_SECRET"
VENDOR_KEY_ENV = "SCRIPTED_VENDOR_KEY"
PARTITIONS = 6
ANSWER = Reply(tokens=tuple(f"w{i} " for i in range(16)), token_delay_s=0.03)
MARKER = re.compile(r"lr-[0-9a-f]{16}")
PRODUCE_TIMEOUT_S = 5.0  # gateway.produce_timeout_s, when that key exists
PRODUCER_DEFAULT_S = 30.0  # the gateway producer's own timeout before it


@dataclass(frozen=True)
class Sizes:
    users: int  # honest users, in each phase
    phase_a_s: float
    phase_b_s: float
    turn_timeout_s: float
    slow_connections: int
    oversize_count: int
    schema_levels: tuple[int, ...]
    pdf_count: int
    bursts: int
    burst_size: int
    retry_count: int


FULL = Sizes(users=50, phase_a_s=100, phase_b_s=150, turn_timeout_s=45, slow_connections=20,
             oversize_count=3, schema_levels=(19, 21, 23, 25), pdf_count=2, bursts=4,
             burst_size=400, retry_count=10)
# Every kind of user and the broker's freeze, each once or a few times: a smoke run.
QUICK = Sizes(users=20, phase_a_s=10, phase_b_s=25, turn_timeout_s=30, slow_connections=5,
              oversize_count=1, schema_levels=(19,), pdf_count=1, bursts=1, burst_size=100,
              retry_count=3)


def default_keys() -> dict[str, set[str]]:
    """config/default.toml's keys per table: the run sets only keys that exist."""
    with (ROOT / "config" / "default.toml").open("rb") as f:
        tables = tomllib.load(f)
    return {name: set(value) for name, value in tables.items() if isinstance(value, dict)}


def write_config(path: Path, stack: tuple[local_stack.Service, ...], llm_url: str,
                 gateway_port: int, workdir: Path, tag: str, keys: dict[str, set[str]]) -> float:
    """One config for the worker and the gateway (the gateway checks model aliases
    against it). Returns the gateway's produce timeout."""
    kafka, rds, pg = stack
    gateway: dict[str, local_stack.Scalar] = {"host": "127.0.0.1", "port": gateway_port,
                                              "dev_signin": False, "page": False}
    produce_timeout = PRODUCER_DEFAULT_S
    if "produce_timeout_s" in keys.get("gateway", set()):
        gateway["produce_timeout_s"] = produce_timeout = PRODUCE_TIMEOUT_S
    path.write_text(local_stack.stack_config(
        kafka=kafka.url, redis=rds.url, postgres=pg.url, llm_url=llm_url, sections={
            "kafka": {"request_topic": f"hostile.request.{tag}",
                      "control_topic": f"hostile.control.{tag}",
                      "dlq_topic": f"hostile.dlq.{tag}", "group_id": f"hostile-{tag}",
                      "partitions": PARTITIONS},
            # A route LiteLLM serves itself (and expands a schema's $refs on).
            "llm.models.gemini": {"model": "gemini/gemini-2.5-flash", "api_base": llm_url,
                                  "api_key_env": VENDOR_KEY_ENV, "max_tokens": 256},
            "jobs": {"lease_s": 5},
            "rag": {"path": str(workdir / "rag")},
            "gateway": gateway,
            "log": {"level": "info"},  # the worker says when it is ready
        }))
    return produce_timeout


@dataclass
class Rig:
    """Everything running: what the phases drive and the checks read."""

    kafka: local_stack.Service
    redis_url: str
    pg_url: str
    llm: ScriptedLLM
    worker: Managed
    gateway: Managed
    watch: Watch
    port: int
    secret: str
    workdir: Path
    pause_s: float


@contextlib.contextmanager
def rig(workdir: Path) -> Iterator[Rig]:
    kafka, rds, pg = local_stack.start_core(workdir)
    llm: ScriptedLLM | None = None
    started: list[Managed] = []
    watch: Watch | None = None
    try:
        llm = ScriptedLLM(default=ANSWER).start()
        tag = uuid.uuid4().hex[:6]
        port = local_stack.free_port()
        config = workdir / "hostile.toml"
        produce_timeout = write_config(config, (kafka, rds, pg), llm.url, port, workdir, tag,
                                       default_keys())
        ensure_topics(kafka.url, {}, [f"hostile.request.{tag}"], PARTITIONS)
        secret = secrets.token_urlsafe(32)
        worker = Managed("worker", ["run", "--config", str(config)], workdir / "worker.log",
                         {VENDOR_KEY_ENV: "scripted-key"}, worker_ready)
        gateway = Managed("gateway", ["gateway", "--config", str(config)],
                          workdir / "gateway.log", {SECRET_ENV: secret}, gateway_ready(port))
        for managed in (worker, gateway):
            managed.start()
            started.append(managed)
        for managed in (worker, gateway):
            managed.wait_ready()
        watch = Watch([worker, gateway])
        watch.start()
        yield Rig(kafka, rds.url, pg.url, llm, worker, gateway, watch, port, secret, workdir,
                  pause_s=produce_timeout + 3)
    finally:
        if watch is not None:
            watch.stop()
        for managed in reversed(started):
            managed.stop()
        if llm is not None:
            llm.stop()
        for service in (pg, rds, kafka):
            service.stop()


def run_clients(rig: Rig, phase: str, plans: dict[str, Plan]) -> dict[str, dict[str, Any]]:
    """One client process per role, started together; the broker is frozen at the
    hostile plan's `pause_at` for `pause_s`. Returns each role's tally."""
    processes: dict[str, subprocess.Popen[str]] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for role, plan in plans.items():
            with (rig.workdir / f"clients-{phase}-{role}.log").open("w") as err:
                process = subprocess.Popen(
                    [sys.executable, "-m", "bench.hostile.clients", role], cwd=ROOT,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)})
            processes[role] = process
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(json.dumps(asdict(plan)) + "\n")
            process.stdin.flush()
        for role, process in processes.items():
            assert process.stdout is not None
            if "ready" not in process.stdout.readline():
                raise RuntimeError(f"the {role} clients did not start: "
                                   f"{_tail(rig.workdir / f'clients-{phase}-{role}.log')}")
        rig.watch.phase = phase
        began = time.monotonic()
        for process in processes.values():
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        hostile = plans.get("hostile")
        if hostile is not None and hostile.pause_s > 0:
            time.sleep(max(0.0, began + hostile.pause_at - time.monotonic()))
            with rig.kafka.frozen():
                time.sleep(hostile.pause_s)
        for role, process in processes.items():
            plan = plans[role]
            left = began + plan.seconds + grace_s(plan) + 30 - time.monotonic()
            out, _ = process.communicate(timeout=max(left, 1))
            lines = out.strip().splitlines()
            if process.returncode or not lines:
                raise RuntimeError(f"the {role} clients failed ({process.returncode}): "
                                   f"{_tail(rig.workdir / f'clients-{phase}-{role}.log')}")
            results[role] = json.loads(lines[-1])
    finally:
        rig.watch.phase = "between"
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def _tail(path: Path) -> str:
    return local_stack.last_words(path, lines=6, chars=1500)


# ---------------------------------------------------------------- what happened


def marker_of(call: Call) -> str | None:
    """The logical request a vendor call answers: the marker ending its last message
    (OpenAI's `messages` or Gemini's `contents`)."""
    turns = call.body.get("messages") or call.body.get("contents") or []
    found = MARKER.findall(json.dumps(turns[-1] if turns else call.body))
    return found[-1] if found else None


def runs(rig: Rig, requests: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Each logical request's (full answers the vendor streamed for it, jobs that hold
    it: the jobIds its POSTs got and the jobs whose history row names it)."""
    markers = {r["marker"]: r for r in requests}
    answers: dict[str, int] = {}
    for call in list(rig.llm.calls):
        found = marker_of(call)
        if found is not None and found in markers and call.finished and not call.disconnected:
            answers[found] = answers.get(found, 0) + 1
    jobs: dict[str, set[str]] = {m: set(r["jobs"]) for m, r in markers.items()}
    with psycopg.connect(rig.pg_url, connect_timeout=10) as conn:
        for job_id, content in conn.execute(
                "SELECT job_id, content FROM llm_messages WHERE role = 'user'"):
            for found in MARKER.findall(content):
                if found in jobs:
                    jobs[found].add(job_id)
    return {m: (answers.get(m, 0), len(jobs[m])) for m in markers}


def missed(rds: redis.Redis, requests: list[dict[str, Any]]
           ) -> tuple[int, int, int, list[dict[str, Any]]]:
    """(entries of the honest jobs' streams never received, turns without their
    `done`, entries in those streams, the first few turns that lost something)."""
    lost = unfinished = total = 0
    examples: list[dict[str, Any]] = []
    for request in requests:
        in_stream = 0
        for job_id in set(request["jobs"]):
            entries = cast(list[tuple[str, dict[str, str]]], rds.xrange(f"sse:chat:{job_id}"))
            ids = {entry_id for entry_id, fields in entries if fields.get("jobId") == job_id}
            in_stream += len(ids)
            lost += len(ids - set(request["ids"]))
        total += in_stream
        if request["done"] is None or len(request["ids"]) < in_stream:
            unfinished += request["done"] is None
            if len(examples) < 5:
                examples.append({"jobs": request["jobs"], "posts": request["statuses"],
                                 "received": len(request["ids"]), "in_stream": in_stream,
                                 "notes": request["notes"][-3:]})
    return lost, unfinished, total, examples


def phase_result(rig: Rig, name: str, tallies: dict[str, dict[str, Any]],
                 pause: tuple[float, float] | None = None) -> Phase:
    """The phase's figures; `pause` is the broker's (start from the phase's, length)."""
    honest = tallies["honest"]
    hostile = tallies.get("hostile", {})
    requests: list[dict[str, Any]] = honest["requests"]
    rds = redis.Redis.from_url(rig.redis_url, decode_responses=True)
    try:
        lost, unfinished, total, examples = missed(rds, requests)
    finally:
        rds.close()
    ran = runs(rig, requests + hostile.get("requests", []))
    ran_twice = {m: {"answers": answers, "jobs": jobs} for m, (answers, jobs) in ran.items()
                 if answers > 1 or jobs > 1}
    statuses = Counter(str(r["done"]) for r in requests)
    latencies: list[float] = honest["latencies_ms"]
    posts = [r["post_ms"] for r in requests if r["post_ms"] is not None]
    # The broker's pause holds every POST begun in it (or just before) for the
    # produce timeout: apart from it, what the other hostile users cost a POST.
    calm = [r["post_ms"] for r in requests if r["post_ms"] is not None
            and (pause is None or r["post_at_s"] + r["post_ms"] / 1000 < pause[0]
                 or r["post_at_s"] > pause[0] + pause[1] + 2)]
    uploads: list[list[float]] = honest["uploads"]
    watched = rig.watch.phases.get(name)
    return Phase(
        name=name, turns=len(requests), done=len(requests) - unfinished, events=total,
        statuses=dict(statuses), answered=sum(ran[r["marker"]][0] > 0 for r in requests),
        missed=lost, unfinished=unfinished,
        caught_up=sum(r["caught_up"] for r in requests),
        p50_ms=percentile(latencies, 50) if latencies else None,
        p99_ms=percentile(latencies, 99) if latencies else None,
        p90_ms=percentile(latencies, 90) if latencies else None,
        max_ms=max(latencies, default=None),
        post_p99_ms=percentile(posts, 99) if posts else None,
        calm_post_p99_ms=percentile(calm, 99) if calm else None,
        uploads=len(uploads), uploads_ok=sum(1 for s, _ in uploads if 200 <= s < 300),
        upload_max_s=max((t for _, t in uploads), default=None),
        gateway_rss=watched.peak_rss.get("gateway", 0) if watched else 0,
        worker_rss=watched.peak_rss.get("worker", 0) if watched else 0,
        run_twice=len(ran_twice), twice_detail=ran_twice,
        worker_exits=watched.exits.get("worker", 0) if watched else 0,
        gateway_exits=watched.exits.get("gateway", 0) if watched else 0,
        capped=sum(watched.capped.values()) if watched else 0,
        exit_lines=watched.last_words if watched else [],
        lost_examples=examples, hostile=hostile.get("kinds", {}),
        cut=bool(honest.get("cut") or hostile.get("cut")), load_1m=os.getloadavg()[0])


# ---------------------------------------------------------------- the run


def plans_for(rig: Rig, sizes: Sizes, seed: int) -> tuple[Plan, Plan, Plan]:
    """(phase A's honest plan, phase B's honest plan, phase B's hostile plan)."""
    honest = Plan(port=rig.port, secret=rig.secret, seconds=sizes.phase_a_s, seed=seed,
                  users=sizes.users, turn_timeout_s=sizes.turn_timeout_s,
                  post_timeout_s=rig.pause_s + sizes.turn_timeout_s)
    phase_b = replace(honest, seconds=sizes.phase_b_s, seed=seed + 1)
    hostile = replace(phase_b, slow_connections=sizes.slow_connections,
                      oversize_count=sizes.oversize_count, schema_levels=sizes.schema_levels,
                      pdf_count=sizes.pdf_count, bursts=sizes.bursts,
                      burst_size=sizes.burst_size, retry_count=sizes.retry_count,
                      pause_at=min(10.0, sizes.phase_b_s / 5), pause_s=rig.pause_s)
    return honest, phase_b, hostile


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally` that stops a process


def run(sizes: Sizes, seed: int, quick: bool, json_path: Path) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # inherited by the gateway
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, hard), hard))
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    began = time.monotonic()
    with local_stack.workdir("chat-actors-hostile-") as workdir, rig(workdir) as r:
        def say(line: str) -> None:
            print(f"  t={time.monotonic() - began:4.0f}s  {line}", flush=True)

        say(f"stack, vendor, worker and gateway up; broker pauses last {r.pause_s:.0f} s")
        honest_a, honest_b, hostile = plans_for(r, sizes, seed)
        warm = replace(honest_a, users=2, seconds=3, uploaders=1, upload_timeout_s=120)
        run_clients(r, "warm-up", {"honest": warm})  # first job, first upload (model load)
        say(f"phase A: {honest_a.users} honest users for {honest_a.seconds:.0f} s")
        result_a = phase_result(r, "A", run_clients(r, "A", {"honest": honest_a}))
        say(f"phase B: {honest_b.users} honest users and the hostile ones for "
            f"{honest_b.seconds:.0f} s")
        result_b = phase_result(r, "B", run_clients(r, "B", {"honest": honest_b,
                                                             "hostile": hostile}),
                                pause=(hostile.pause_at, hostile.pause_s))
        say("phases done; stopping")
    elapsed = time.monotonic() - began
    checks = bars(result_a, result_b)
    print_report(result_a, result_b, checks, elapsed, quick, RSS_CAP)
    write_result(json_path, quick=quick, wall_s=elapsed, seed=seed, sizes=asdict(sizes),
                 phases={p.name: asdict(p) for p in (result_a, result_b)},
                 bars=[asdict(c) for c in checks])
    # A quick run is too short for its tail latency and peaks to mean much: it is judged
    # on what must hold in any run (nothing missed, nothing run twice, no exits).
    return 0 if all(c.passed for c in checks if not (quick and c.measured)) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-actors bench chaos --gateway",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run, not numbers to quote: {QUICK.users} honest users, "
                             f"phases of {QUICK.phase_a_s:.0f} s and {QUICK.phase_b_s:.0f} s, each "
                             "hostile kind a few times; judged only on the bars that hold in "
                             "any run (about 1.5 minutes)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=RESULTS / "chaos-gateway.json",
                        metavar="FILE", help="where to write the results (default "
                                             "bench/results/chaos-gateway.json)")
    args = parser.parse_args(argv)
    return run(QUICK if args.quick else FULL, args.seed, args.quick, args.json)


if __name__ == "__main__":
    sys.exit(main())
