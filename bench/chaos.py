"""Chaos run: N jobs through a worker while everything around it fails.

The worker runs as `chat-actors run` (a real process). Meanwhile this script
SIGKILLs and restarts the worker, makes Redis and the broker unreachable
(SIGSTOP ... SIGCONT: both keep their data only in memory), restarts Postgres
for real, and the scripted vendor answers with 429s, 500s, stalls and streams
broken mid-answer. At the end it checks every job's stream and row.

Hostile (the default; --no-hostile leaves it out): in the same run, requests
and control messages an attacker or a broken neighbour would send (deep
nesting, U+0000, oversize, invalid UTF-8, wrong types, forged ids, RAG filters
Chroma refuses) go between the good ones, and the vendor sometimes answers
with broken HTTP (a negative chunk size, a doubled Content-Length, bytes that
are not HTTP, endless headers, gzip unasked, a 101, a close mid-chunk).

Many workers (--workers 3): three workers in one consumer group. One starts; two
join while the jobs stream; one is SIGKILLed; one is frozen (SIGSTOP) past its
leases and the session timeout until another worker has taken over a job of its,
then woken; Postgres is frozen past every lease and thawed (tests/many_workers.py).
The vendor is as chaotic as above, and speaks as several vendors: the jobs ask in
turn for a self-served model that continues, one that does not, Claude 4.6 (no
prefill, through LiteLLM's Anthropic route), Claude 4.5 (prefill), Claude Opus 4.7
configured as continuing though it refuses, and Mistral (prefix: true), with
fallbacks across them; Redis is stopped twice for a while (its slow phases). The
printout checks contract 6.1, 4.2 and 4.11 (tests/invariants.py) and continuation
on every vendor (3.3): jobs failed because of it (goal 0), model calls for jobs
already finished (goal 0), restarts and resumes by reason, answer tokens paid
twice (goal 0 outside restarts) and prompt tokens paid again; it counts the jobs
the vendor answered twice: legitimate after a lost lease, never visible to a client.

Hostile clients of the gateway (--gateway): 50 honest users streaming through the
gateway, alone and then beside users who send forged Last-Event-IDs, 400 MB and
slowloris bodies, schema and PDF bombs, bursts of waits for unknown jobs, and retries
across a frozen broker; one table of both phases against issue 35's bars
(bench/hostile/run.py).

    bin/chat-actors bench chaos [--jobs 500] [--seed 7] [--timeout 600] [--no-hostile]
                                [--workers 3] [--quick] [--json FILE]
    bin/chat-actors bench chaos --gateway [--quick] [--seed 7] [--json FILE]

Each writes what it prints as JSON (default bench/results/chaos.json, chaos-workers.json
with --workers 3, chaos-gateway.json with --gateway).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import confluent_kafka
import redis

from actors.adapters.kafka import ensure_topics
from bench import RESULTS, write_result
from tests.hostile import BROKEN_HTTP, CUT_MID_CHUNK, HOSTILE_CONTROL, MAX_REQUEST_BYTES, hostile_requests
from tests.invariants import NumberedLLM, uncommitted_partitions, verify
from tests.many_workers import Choreography, WorkerProcess, count_done, produce_jobs
from tests.scripted_llm import Reply
from tools import local_stack

PARTITIONS = 6
LEASE_S = 3
# --quick: fewer jobs (one worker; three workers) and a shorter bound, the same faults.
QUICK_JOBS, QUICK_JOBS_MANY, QUICK_TIMEOUT_S = 40, 60, 120.0


class ChaoticLLM(NumberedLLM):
    """Answers most calls; some get a 429, a 500, a stall or a broken stream, and when
    hostile, broken HTTP. Every answer is numbered (tests.invariants)."""

    def __init__(self, seed: int, hostile: bool = False, *, tokens: int = 8,
                 token_delay_s: float = 0.02, broken_share: float = 0.05,
                 stall_s: float = 3.0) -> None:
        super().__init__()
        self._rng = random.Random(seed)
        self._broken = [*BROKEN_HTTP.values(), CUT_MID_CHUNK] if hostile else []
        self._tokens = tuple(f"w{i} " for i in range(tokens))
        self._delay = token_delay_s
        self.broken_sent = 0
        self._broken_share = broken_share  # streams cut at a random point
        self._stall_s = stall_s  # a first token this late: past the limit

    def choose(self) -> Reply:
        roll = self._rng.random()
        tokens, delay = self._tokens, self._delay
        if self._broken and roll > 0.94:
            self.broken_sent += 1
            return Reply(raw=self._rng.choice(self._broken))
        if roll < 0.05:
            return Reply(status=429, headers=(("retry-after", "0.2"),))
        if roll < 0.10:
            return Reply(status=500)
        if roll < 0.13:
            return Reply(tokens=tokens, first_token_delay_s=self._stall_s)  # stalled
        if roll < 0.13 + self._broken_share:
            return Reply(tokens=tokens, token_delay_s=delay,
                         break_after=self._rng.randint(1, len(tokens)))
        return Reply(tokens=tokens, token_delay_s=delay)


def write_config(path: Path, kafka: str, rds: str, pg: str, llm: str, tag: str,
                 health_port: int, **sections: dict[str, local_stack.Scalar]) -> None:
    """The chaos config; `sections` override keys per table."""
    tables: dict[str, dict[str, local_stack.Scalar]] = {
        "health": {"port": health_port},
        # The limits tests/hostile.py builds its oversize values against.
        "limits": {"max_request_bytes": MAX_REQUEST_BYTES, "max_message_chars": 1000},
        "kafka": {"request_topic": f"chaos.request.{tag}", "control_topic": f"chaos.control.{tag}",
                  "dlq_topic": f"chaos.dlq.{tag}", "group_id": f"chaos-{tag}",
                  "session_timeout_ms": 3000, "partitions": PARTITIONS},
        "redis": {"socket_timeout_s": 1},
        "llm": {"retries": 3, "retry_backoff_s": 0.1, "retry_backoff_cap_s": 1},
        "jobs": {"lease_s": LEASE_S, "first_token_timeout_s": 1.5, "idle_timeout_s": 1.5,
                 "timeout_s": 120, "max_in_flight": 64},
        "shutdown": {"grace_s": 2},
    }
    for table, values in sections.items():
        tables[table] = {**tables.get(table, {}), **values}
    path.write_text(local_stack.stack_config(kafka=kafka, redis=rds, postgres=pg, llm_url=llm,
                                             sections=tables))


@dataclass
class LongestStep:
    """The longest task step the worker's watchdog reported, across its restarts."""

    port: int
    seconds: float = 0.0
    task: str = ""

    def sample(self) -> None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                        timeout=0.5) as response:
                text = response.read().decode()
        except OSError:
            return  # restarting, or paused dependencies: next time
        for line in text.splitlines():
            if line.startswith("chat_actors_longest_step_seconds{"):
                labels, _, value = line.rpartition(" ")
                if float(value) > self.seconds:
                    self.seconds, self.task = float(value), labels.split('"')[1]


def produce_hostile(producer: confluent_kafka.Producer, tag: str, count: int,
                    rng: random.Random) -> int:
    """Hostile requests and control messages; returns how many were sent."""
    sent = 0
    for i in range(count):
        template = {"jobId": f"hostile-{tag}-{i}", "userId": "mallory",
                    "sessionId": f"h{i}", "message": "m"}
        for value in hostile_requests(template):
            producer.produce(f"chaos.request.{tag}", key=f"h{i}".encode(), value=value)
            sent += 1
        for value in rng.sample(HOSTILE_CONTROL, len(HOSTILE_CONTROL)):
            producer.produce(f"chaos.control.{tag}", key=b"c", value=value)
            sent += 1
        producer.poll(0)
    return sent


def run(jobs_total: int, seed: int, timeout_s: float, workdir: Path, hostile: bool, *,
        quick: bool, json_path: Path) -> int:
    """One worker, restarted and SIGKILLed, among random dependency faults."""
    rng = random.Random(seed)
    kafka, rds_service, pg = local_stack.start_core(workdir)
    llm = _started(ChaoticLLM(seed, hostile), kafka, rds_service, pg)
    tag = uuid.uuid4().hex[:6]
    config_path = workdir / "chaos.toml"
    steps = LongestStep(local_stack.free_port())
    hostile_sent = 0
    worker = WorkerProcess(config_path, workdir / "worker.log")
    rds = redis.Redis.from_url(rds_service.url, decode_responses=True)
    template = "sse:chat:{job_id}"
    jobs = [f"chaos-{tag}-{i}" for i in range(jobs_total)]
    actions: dict[str, int] = {}
    started = time.monotonic()
    try:
        write_config(config_path, kafka.url, rds_service.url, pg.url, llm.url, tag, steps.port)
        ensure_topics(kafka.url, {}, [f"chaos.request.{tag}"], PARTITIONS)
        worker.start()
        produce_jobs(kafka.url, f"chaos.request.{tag}", jobs, sessions=jobs_total // 4 or 1)
        if hostile:  # after the good ones, on every partition
            producer = confluent_kafka.Producer({"bootstrap.servers": kafka.url,
                                                 "log.connection.close": False})
            for i in range(0, jobs_total, 100):
                hostile_sent += produce_hostile(producer, f"{tag}-{i}", 1, rng)
            if producer.flush(30):
                raise RuntimeError("could not produce the hostile messages")
        print(f"submitted {jobs_total} jobs; chaos begins", flush=True)
        while time.monotonic() - started < timeout_s:
            finished = count_done(rds, jobs, template)
            if finished == jobs_total:
                break
            action = rng.choice(["kill_worker", "pause_redis", "restart_postgres",
                                 "pause_broker", "pause_postgres", "calm", "calm"])
            actions[action] = actions.get(action, 0) + 1
            if action == "kill_worker":
                worker.kill()
                worker.start()
            elif action == "pause_redis":
                with rds_service.frozen():
                    time.sleep(rng.uniform(1, 4))
            elif action == "restart_postgres":
                pg.stop()
                time.sleep(rng.uniform(0.5, 2))
                pg = local_stack.start_postgres(workdir, pg.port)
            elif action == "pause_broker":
                with kafka.frozen():
                    time.sleep(rng.uniform(1, 4))
            elif action == "pause_postgres":
                with pg.frozen():
                    time.sleep(rng.uniform(1, 3))
            for _ in range(int(rng.uniform(2, 5) / 0.25)):
                worker.check()
                steps.sample()
                time.sleep(0.25)
            print(f"  t={time.monotonic() - started:5.0f}s  done {finished}/{jobs_total}  "
                  f"last action: {action}", flush=True)
        steps.sample()
        worker.stop()
        verdict = verify(jobs, rds, pg.url, llm, template=template)
        verdict.uncommitted = uncommitted_partitions(kafka.url, f"chaos.request.{tag}",
                                                     f"chaos-{tag}")
    finally:
        worker.stop()
        llm.stop()
        rds.close()
        for service in (pg, rds_service, kafka):
            service.stop()
    elapsed = time.monotonic() - started
    exits = "".join(f"    {line}\n" for line in worker.exits)  # why each crash happened
    print(f"""
chaos run: {jobs_total} jobs, seed {seed}, {elapsed:.0f} s
  actions: {', '.join(f'{k} x{v}' for k, v in sorted(actions.items()))}
  vendor calls: {len(llm.calls)} (with injected 429/500/stalls/broken streams)
{_indent(verdict.report())}
  worker crashes (exits we did not cause): {worker.crashes}  (SIGKILLs we sent: {worker.kills})
{exits}  hostile messages sent:                  {hostile_sent}  (broken HTTP answers: {llm.broken_sent})
  longest task step (watchdog):           {steps.seconds * 1000:.1f} ms ({steps.task or "-"})
  peak worker RSS:                        {worker.peak_rss / 1e6:.0f} MB""")
    write_result(json_path, quick=quick, wall_s=elapsed, mode="one worker", jobs=jobs_total,
                 seed=seed, actions=actions, vendor_calls=len(llm.calls),
                 problems=verdict.problems(), verdict=asdict(verdict),
                 worker=_worker_numbers(worker), hostile_sent=hostile_sent,
                 broken_http_sent=llm.broken_sent,
                 longest_step={"ms": steps.seconds * 1000, "task": steps.task})
    return 0 if verdict.problems() + worker.crashes == 0 else 1


def _started(llm: ChaoticLLM, *stack: local_stack.Service) -> ChaoticLLM:
    """The vendor, started; if it cannot start, the stack is stopped first."""
    try:
        return llm.start()
    except BaseException:
        for service in reversed(stack):
            service.stop()
        raise


def _worker_numbers(worker: WorkerProcess) -> dict[str, object]:
    return {"crashes": worker.crashes, "kills": worker.kills, "exits": worker.exits,
            "peak_rss_mb": worker.peak_rss / 1e6}


# The aliases the many-workers run's jobs ask for in turn: (alias, its keys). Each
# falls back to another vendor's alias; the scripted vendor refuses a prefill as
# the real one does (tests/scripted_llm.refusal).
VENDOR_MIX: dict[str, dict[str, local_stack.Scalar]] = {
    "local": {"fallbacks": ["claude46"]},  # self-served: continues
    "plain": {"model": "openai/scripted", "continues": False, "fallbacks": ["claude45"]},
    "claude46": {"model": "anthropic/claude-sonnet-4-6", "fallbacks": ["local"]},
    "claude45": {"model": "anthropic/claude-sonnet-4-5", "fallbacks": ["plain"]},
    "fooled": {"model": "anthropic/claude-opus-4-7", "continues": True,
               "fallbacks": ["mistral"]},
    "mistral": {"model": "mistral/mistral-small-latest", "fallbacks": ["claude46"]},
}


def _vendor_mix(llm_url: str) -> dict[str, dict[str, local_stack.Scalar]]:
    return {f"llm.models.{alias}": {"api_base": llm_url, "api_key_env": "SCRIPTED_LLM_KEY",
                                    "max_tokens": 256, **keys}
            for alias, keys in VENDOR_MIX.items()}


def run_many(jobs_total: int, seed: int, timeout_s: float, workdir: Path, hostile: bool, *,
             quick: bool, json_path: Path) -> int:
    """Three workers in one group (contract 6.13): tests.many_workers' choreography."""
    kafka, rds_service, pg = local_stack.start_core(workdir)
    # Answers stream for about two seconds: the jobs outlast every step.
    llm = _started(ChaoticLLM(seed, hostile, tokens=20, token_delay_s=0.1, broken_share=0.15,
                              stall_s=6.0), kafka, rds_service, pg)
    tag = uuid.uuid4().hex[:6]
    config_path = workdir / "chaos.toml"
    topic = f"chaos.request.{tag}"
    rds = redis.Redis.from_url(rds_service.url, decode_responses=True)
    jobs = [f"chaos-{tag}-{i}" for i in range(jobs_total)]
    workers = [WorkerProcess(config_path, workdir / f"worker-{n}.log") for n in range(3)]
    choreography = Choreography(
        workers=workers, jobs=jobs, bootstrap=kafka.url, topic=topic, rds=rds, pg_url=pg.url,
        postgres=pg, lease_s=LEASE_S, timeout_s=timeout_s, group=f"chaos-{tag}",
        models=list(VENDOR_MIX), redis=rds_service,
        say=lambda line: print(f"  t={time.monotonic() - started:5.0f}s  {line}", flush=True))
    started = time.monotonic()
    try:
        # Room for every job, so the intake never pauses (see tests/test_many_workers.py).
        # At info level a worker says when it is ready, which the choreography waits for.
        # LiteLLM's own routes (Anthropic, Mistral) spend ~20 ms of CPU setting up each
        # call: with dozens starting at once a first token takes seconds (measured: p90
        # 1.4-2.7 s for 80 at once, LiteLLM alone), so the stall limits leave room for it.
        write_config(config_path, kafka.url, rds_service.url, pg.url, llm.url, tag, 0,
                     jobs={"max_in_flight": max(64, jobs_total), "first_token_timeout_s": 4.5,
                           "idle_timeout_s": 3},
                     log={"level": "info"}, **_vendor_mix(llm.url))
        os.environ.setdefault("SCRIPTED_LLM_KEY", "sk-scripted-not-secret")  # the workers'
        ensure_topics(kafka.url, {}, [topic], PARTITIONS)
        choreography.run()
        exit_codes = choreography.stop()
        verdict = verify(jobs, rds, pg.url, llm)
        verdict.uncommitted = uncommitted_partitions(kafka.url, topic, f"chaos-{tag}")
    finally:
        choreography.stop()
        llm.stop()
        rds.close()
        for service in (pg, rds_service, kafka):
            service.stop()
    crashes = sum(w.crashes for w in workers)
    exits = "".join(f"    {line}\n" for w in workers for line in w.exits)
    elapsed = time.monotonic() - started
    print(f"""
many-workers chaos run: {jobs_total} jobs, 3 workers, seed {seed}, {elapsed:.0f} s
  vendor calls: {len(llm.calls)} (with injected 429/500/stalls/broken streams)
{_indent(verdict.report())}
  jobs of the frozen worker run again meanwhile: {len(choreography.taken_over)}
  exit codes of the workers stopped at the end:  {exit_codes}
  worker crashes (exits we did not cause):      {crashes}
{exits}  peak worker RSS:                              \
{max(w.peak_rss for w in workers) / 1e6:.0f} MB""")
    write_result(json_path, quick=quick, wall_s=elapsed, mode="three workers", jobs=jobs_total,
                 seed=seed, vendor_calls=len(llm.calls), problems=verdict.problems(),
                 verdict=asdict(verdict), taken_over=len(choreography.taken_over),
                 exit_codes=exit_codes, workers=[_worker_numbers(w) for w in workers])
    return 0 if verdict.problems() + crashes == 0 and set(exit_codes) == {0} else 1


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--gateway" in argv:  # its own options (bench/hostile/run.py)
        from bench.hostile.run import main as hostile_gateway

        return hostile_gateway([arg for arg in argv if arg != "--gateway"])
    parser = argparse.ArgumentParser(prog="chat-actors bench chaos",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int,
                        help=f"default 500; --quick {QUICK_JOBS}, or {QUICK_JOBS_MANY} with "
                             "--workers 3")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float,
                        help=f"seconds of chaos at most (default 600; --quick "
                             f"{QUICK_TIMEOUT_S:.0f})")
    parser.add_argument("--hostile", action=argparse.BooleanOptionalAction, default=True,
                        help="hostile input and broken HTTP in the same run (default: on)")
    parser.add_argument("--workers", type=int, choices=(1, 3), default=1,
                        help="1: one worker among random faults; 3: three workers joining, "
                             "SIGKILLed and frozen, and Postgres frozen (default: 1)")
    parser.add_argument("--gateway", action="store_true",
                        help="the hostile-client run of the gateway instead (its options: "
                             "--quick, --seed, --json; see bench/hostile/run.py)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run, not numbers to quote: {QUICK_JOBS} jobs "
                             f"({QUICK_JOBS_MANY} with --workers 3), at most "
                             f"{QUICK_TIMEOUT_S:.0f} s of chaos (under a minute)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="where to write the results (default bench/results/chaos.json; "
                             "with --workers 3, chaos-workers.json)")
    args = parser.parse_args(argv)
    many = args.workers == 3
    if args.jobs is None:
        args.jobs = (QUICK_JOBS_MANY if many else QUICK_JOBS) if args.quick else 500
    if args.timeout is None:
        args.timeout = QUICK_TIMEOUT_S if args.quick else 600.0
    if args.jobs < 4:
        parser.error("--jobs must be at least 4")
    json_path = args.json or RESULTS / ("chaos-workers.json" if many else "chaos.json")
    with local_stack.workdir("chat-actors-chaos-") as workdir:
        chaos = run_many if many else run
        return chaos(args.jobs, args.seed, args.timeout, workdir, args.hostile,
                     quick=args.quick, json_path=json_path)


if __name__ == "__main__":
    sys.exit(main())
