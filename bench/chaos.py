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

    bin/chat-actors bench chaos [--jobs 500] [--seed 7] [--timeout 600] [--no-hostile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import confluent_kafka
import psutil
import psycopg
import redis

from config import job_keys
from tests.hostile import BROKEN_HTTP, CUT_MID_CHUNK, HOSTILE_CONTROL, MAX_REQUEST_BYTES, hostile_requests
from tests.scripted_llm import Reply, ScriptedLLM
from tools import local_stack

ROOT = Path(__file__).resolve().parent.parent


class ChaoticLLM(ScriptedLLM):
    """Answers most calls; some get a 429, a 500, a stall or a broken stream, and when
    hostile, broken HTTP."""

    def __init__(self, seed: int, hostile: bool = False) -> None:
        super().__init__()
        self._rng = random.Random(seed)
        self._broken = [*BROKEN_HTTP.values(), CUT_MID_CHUNK] if hostile else []
        self.broken_sent = 0

    def _next_reply(self) -> Reply:
        roll = self._rng.random()
        tokens = tuple(f"w{i} " for i in range(8))
        if self._broken and roll > 0.94:
            self.broken_sent += 1
            return Reply(raw=self._rng.choice(self._broken))
        if roll < 0.05:
            return Reply(status=429, headers=(("retry-after", "0.2"),))
        if roll < 0.10:
            return Reply(status=500)
        if roll < 0.13:
            return Reply(tokens=tokens, first_token_delay_s=3.0)  # stall past the limit
        if roll < 0.18:
            return Reply(tokens=tokens, token_delay_s=0.02, break_after=3)
        return Reply(tokens=tokens, token_delay_s=0.02)


@dataclass
class Worker:
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    crashes: int = 0
    kills: int = 0
    peak_rss: int = 0
    expected_exit: bool = False
    rss_samples: list[int] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)  # each crash: the log's last words

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tools.cli", "run", "--config", str(self.config_path)],
                cwd=ROOT, stdout=log, stderr=log,
                env={**os.environ, "PYTHONPATH": str(ROOT)})

    def check(self) -> None:
        """Restart a worker that died by itself (a crash), and sample its memory."""
        assert self.process is not None
        if self.process.poll() is not None:
            self.crashes += 1
            self.exits.append(f"exit {self.process.returncode}: "
                              f"{local_stack.last_words(self.log_path, lines=2)}")
            self.start()
            return
        try:
            rss = psutil.Process(self.process.pid).memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)
        except psutil.NoSuchProcess:
            pass

    def kill_and_restart(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.kills += 1
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def pause(service: local_stack.Service, seconds: float) -> None:
    os.kill(service.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(service.pid, signal.SIGCONT)


def pause_postgres(service: local_stack.Service, seconds: float) -> None:
    root = psutil.Process(service.pid)
    tree = [root, *root.children(recursive=True)]
    for p in tree:
        os.kill(p.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        for p in tree:
            with contextlib.suppress(ProcessLookupError):  # a backend may have exited
                os.kill(p.pid, signal.SIGCONT)


def write_config(path: Path, kafka: str, rds: str, pg: str, llm: str, tag: str,
                 health_port: int) -> None:
    path.write_text(local_stack.stack_config(kafka=kafka, redis=rds, postgres=pg, llm_url=llm,
                                             sections={
        "health": {"port": health_port},
        # The limits tests/hostile.py builds its oversize values against.
        "limits": {"max_request_bytes": MAX_REQUEST_BYTES, "max_message_chars": 1000},
        "kafka": {"request_topic": f"chaos.request.{tag}", "control_topic": f"chaos.control.{tag}",
                  "dlq_topic": f"chaos.dlq.{tag}", "group_id": f"chaos-{tag}",
                  "session_timeout_ms": 3000},
        "redis": {"socket_timeout_s": 1},
        "llm": {"retries": 3, "retry_backoff_s": 0.1, "retry_backoff_cap_s": 1},
        "jobs": {"lease_s": 3, "first_token_timeout_s": 1.5, "idle_timeout_s": 1.5,
                 "timeout_s": 120, "max_in_flight": 64},
        "shutdown": {"grace_s": 2},
    }))


def verify(jobs: list[str], rds: redis.Redis, pg_url: str, llm: ScriptedLLM,
           template: str) -> dict[str, int]:
    one_done = gaps = lost = 0
    done_at: dict[str, float] = {}
    for job_id in jobs:
        entries = [f for _, f in rds.xrange(template.replace("{job_id}", job_id))
                   if f.get("jobId") == job_id]
        dones = [f for f in entries if f["event"] == "done"]
        if not dones:
            lost += 1
            continue
        if len(dones) == 1:
            one_done += 1
        done_at[job_id] = int(dones[-1]["ts"]) / 1000
        by_attempt: dict[str, list[int]] = {}
        for f in entries:
            by_attempt.setdefault(f["attempt"], []).append(int(f["seq"]))
        gaps += sum(seqs != list(range(len(seqs))) for seqs in by_attempt.values())
    # A model call that began after its job's `done` was written: a second bill.
    after_done = sum(1 for call in llm.calls
                     if (job := call.messages[-1]["content"].split()[-1]) in done_at
                     and call.wall_at > done_at[job] + 0.05)
    with psycopg.connect(pg_url) as conn:
        statuses = dict(conn.execute(
            "SELECT status, count(*) FROM llm_jobs WHERE job_id = ANY(%s) GROUP BY status",
            (jobs,)).fetchall())
    left_running = statuses.get("queued", 0) + statuses.get("running", 0)
    return {"one_done": one_done, "gaps": gaps, "lost": lost, "after_done": after_done,
            "left_running": left_running,
            "statuses": ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))}


def stuck_partitions(bootstrap: str, topic: str, group: str) -> int:
    """Partitions whose committed offset is behind their end once every job is done:
    a message the worker could never settle (goal 0)."""
    consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                         "enable.auto.commit": False,
                                         "log.connection.close": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed(
            [confluent_kafka.TopicPartition(topic, p) for p in partitions], timeout=10)
        stuck = 0
        for tp in committed:
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            stuck += high > low and tp.offset < high  # (never committed: offset < 0)
        return stuck
    finally:
        consumer.close()


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


def run(jobs_total: int, seed: int, timeout_s: float, workdir: Path, hostile: bool) -> int:
    rng = random.Random(seed)
    kafka, rds_service, pg = local_stack.start_core(workdir)
    llm = ChaoticLLM(seed, hostile).start()
    tag = uuid.uuid4().hex[:6]
    config_path = workdir / "chaos.toml"
    steps = LongestStep(local_stack.free_port())
    write_config(config_path, kafka.url, rds_service.url, pg.url, llm.url, tag, steps.port)
    hostile_sent = 0
    worker = Worker(config_path, workdir / "worker.log")
    rds = redis.Redis.from_url(rds_service.url, decode_responses=True)
    template = "sse:chat:{job_id}"
    jobs = [f"chaos-{tag}-{i}" for i in range(jobs_total)]
    actions: dict[str, int] = {}
    started = time.monotonic()
    try:
        worker.start()
        producer = confluent_kafka.Producer({"bootstrap.servers": kafka.url,
                                             "log.connection.close": False})
        for i, job_id in enumerate(jobs):
            session = f"s{i % (jobs_total // 4 or 1)}"  # some sessions get several jobs
            producer.produce(f"chaos.request.{tag}", key=session.encode(), value=json.dumps({
                "jobId": job_id, "userId": f"u{i % 13}", "sessionId": session,
                "message": f"question for {job_id}"}).encode())
            if hostile and i % 100 == 50:  # between the good ones, on every partition
                hostile_sent += produce_hostile(producer, f"{tag}-{i}", 1, rng)
        if producer.flush(30):
            raise RuntimeError("could not produce the jobs")
        print(f"submitted {jobs_total} jobs; chaos begins", flush=True)
        while time.monotonic() - started < timeout_s:
            finished = sum(1 for j in jobs if rds.exists(job_keys(template, j, cluster=False).done))
            if finished == jobs_total:
                break
            action = rng.choice(["kill_worker", "pause_redis", "restart_postgres",
                                 "pause_broker", "pause_postgres", "calm", "calm"])
            actions[action] = actions.get(action, 0) + 1
            if action == "kill_worker":
                worker.kill_and_restart()
            elif action == "pause_redis":
                pause(rds_service, rng.uniform(1, 4))
            elif action == "restart_postgres":
                pg.stop()
                time.sleep(rng.uniform(0.5, 2))
                pg = local_stack.start_postgres(workdir, pg.port)
            elif action == "pause_broker":
                pause(kafka, rng.uniform(1, 4))
            elif action == "pause_postgres":
                pause_postgres(pg, rng.uniform(1, 3))
            for _ in range(int(rng.uniform(2, 5) / 0.25)):
                worker.check()
                steps.sample()
                time.sleep(0.25)
            print(f"  t={time.monotonic() - started:5.0f}s  done {finished}/{jobs_total}  "
                  f"last action: {action}", flush=True)
        steps.sample()
        worker.stop()
        result = verify(jobs, rds, pg.url, llm, template)
        stuck = stuck_partitions(kafka.url, f"chaos.request.{tag}", f"chaos-{tag}")
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
  jobs submitted:                         {jobs_total}
  jobs with exactly one done:             {result['one_done']}
  jobs lost (no done):                    {result['lost']}
  jobs left queued/running in Postgres:   {result['left_running']}
  final statuses:                         {result['statuses']}
  model calls for already-completed jobs: {result['after_done']}
  gaps or duplicates in event sequences:  {result['gaps']}
  worker crashes (exits we did not cause): {worker.crashes}  (SIGKILLs we sent: {worker.kills})
{exits}  hostile messages sent:                  {hostile_sent}  (broken HTTP answers: {llm.broken_sent})
  partitions whose commit stopped:        {stuck}
  longest task step (watchdog):           {steps.seconds * 1000:.1f} ms ({steps.task or "-"})
  peak worker RSS:                        {worker.peak_rss / 1e6:.0f} MB""")
    bad = result["lost"] + result["gaps"] + result["after_done"] + worker.crashes + stuck
    return 0 if bad == 0 and result["one_done"] == jobs_total else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-actors bench chaos",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=600, help="seconds of chaos at most")
    parser.add_argument("--hostile", action=argparse.BooleanOptionalAction, default=True,
                        help="hostile input and broken HTTP in the same run (default: on)")
    args = parser.parse_args(argv)
    if args.jobs < 4:
        parser.error("--jobs must be at least 4")
    with local_stack.workdir("chat-actors-chaos-") as workdir:
        return run(args.jobs, args.seed, args.timeout, workdir, args.hostile)


if __name__ == "__main__":
    sys.exit(main())
