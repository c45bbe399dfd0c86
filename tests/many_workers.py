"""Many workers in one consumer group, as real processes, and the choreography that
tries them (contract 6.13): start with one, add two while the jobs stream (the
rest of the jobs trickle in as they join, so they get work of their own), SIGKILL one,
freeze another past `lease_s` and the session timeout and wake it, freeze Postgres
past `lease_s` and thaw it. Every wait is on something the run shows (a done marker,
a lease in Postgres), never on a guess of how long it takes; only the faults last
a set time, since that is what they are.

Used by tests/test_many_workers.py (a small run) and `bench chaos --workers 3`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import confluent_kafka
import psycopg
import redis

from config import job_keys
from tests.invariants import uncommitted_partitions
from tools import local_stack

ROOT = Path(__file__).resolve().parent.parent


def launch_worker(config_path: Path, log_path: Path, **env: str) -> subprocess.Popen[bytes]:
    """`chat-actors run --config` as a real process, its output appended to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "run", "--config", str(config_path)], cwd=ROOT,
            stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def count_done(rds: redis.Redis, jobs: list[str], template: str) -> int:
    """How many of `jobs` have their done marker, in one round trip."""
    with rds.pipeline(transaction=False) as pipe:
        for job_id in jobs:
            pipe.exists(job_keys(template, job_id, cluster=False).done)
        return sum(pipe.execute())


@dataclass
class WorkerProcess:
    """`chat-actors run --config` as a real process, its output in `log_path`."""

    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    crashes: int = 0  # exits we did not cause
    kills: int = 0
    peak_rss: int = 0
    exits: list[str] = field(default_factory=list)  # each crash: the log's last words

    def start(self) -> WorkerProcess:
        self.process = launch_worker(self.config_path, self.log_path)
        return self

    def ready(self) -> bool:
        """Has it said it is ready (its intake is consuming)?"""
        return self.log_path.exists() and b" ready: " in self.log_path.read_bytes()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check(self) -> None:
        """Restart a worker that died by itself (a crash), and sample its memory."""
        import psutil

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

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.kills += 1

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the graceful stop); SIGKILL after `timeout_s`. Returns the exit code."""
        if self.process is None:
            return None
        return local_stack.terminate(self.process, signal.SIGTERM, timeout_s)


def produce_jobs(bootstrap: str, topic: str, jobs: list[str], *, sessions: int,
                 first: int = 0, models: Sequence[str] = ()) -> None:
    """One request per job, `sessions` sessions (some get several jobs); each message
    ends with its job id (tests.invariants.job_of). `first` numbers a later wave;
    `models`: the aliases the jobs ask for in turn (none: the default)."""
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap,
                                         "log.connection.close": False})
    for i, job_id in enumerate(jobs, first):
        session = f"s{i % sessions}"
        producer.produce(topic, key=session.encode(), value=json.dumps({
            "jobId": job_id, "userId": f"u{i % 13}", "sessionId": session,
            "message": f"question for {job_id}",
            **({"model": models[i % len(models)]} if models else {})}).encode())
        producer.poll(0)
    if producer.flush(30):
        raise RuntimeError("could not produce the jobs")


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float,
             between: Callable[[], None] = lambda: None) -> None:
    """Check `condition` (a query of Redis or Postgres) every 0.1 s until it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        between()
        time.sleep(0.1)


@dataclass
class Choreography:
    """The many-workers run: what it needs, and what it did (for the printout)."""

    workers: list[WorkerProcess]  # three, not started
    jobs: list[str]
    bootstrap: str
    topic: str
    rds: redis.Redis
    pg_url: str
    postgres: local_stack.Service
    lease_s: float
    group: str  # the workers' consumer group, whose committed offsets are checked
    say: Callable[[str], None] = print
    timeout_s: float = 300.0
    template: str = "sse:chat:{job_id}"
    taken_over: list[str] = field(default_factory=list)  # the frozen worker's jobs, rerun
    models: Sequence[str] = ()  # the aliases the jobs ask for in turn
    redis: local_stack.Service | None = None  # given: Redis is made slow in two phases
    slow_redis_s: float = 1.5

    def finished(self) -> int:
        return count_done(self.rds, self.jobs, self.template)

    def running_under(self, worker: WorkerProcess) -> dict[str, int]:
        """The jobs whose lease `worker` holds now: job id -> attempt."""
        with psycopg.connect(self.pg_url, connect_timeout=5) as conn:
            return dict(conn.execute(
                "SELECT job_id, attempt FROM llm_jobs WHERE status = 'running' "
                "AND lease_owner LIKE %s AND job_id = ANY(%s)",
                (f"%:{worker.pid}:%", self.jobs)).fetchall())

    def attempts(self, jobs: list[str]) -> dict[str, tuple[int, str]]:
        with psycopg.connect(self.pg_url, connect_timeout=5) as conn:
            return {r[0]: (r[1], r[2] or "") for r in conn.execute(
                "SELECT job_id, attempt, lease_owner FROM llm_jobs WHERE job_id = ANY(%s)",
                (jobs,)).fetchall()}

    def run(self) -> None:
        first, joining, frozen = self.workers
        check = self._check_all
        sessions = max(1, len(self.jobs) // 6)  # six jobs each: every session streams a while
        wave = len(self.jobs) // 3
        first.start()
        produce_jobs(self.bootstrap, self.topic, self.jobs[:wave], sessions=sessions,
                     models=self.models)
        wait_for("the first jobs to finish on one worker", lambda: self.finished() >= 5,
                 self.timeout_s, check)
        self.say(f"one worker: {self.finished()} done; two more join")
        joining.start()
        frozen.start()
        # The rest trickles in until both have run a job: a job the first worker
        # fetched before the rebalance stays its own, so only later ones reach them.
        for worker in (joining, frozen):
            wait_for(f"worker {worker.pid} to start", worker.ready, self.timeout_s, check)
        sent = wave
        while not all(self.running_under(w) for w in (joining, frozen)):
            if sent == len(self.jobs):
                raise TimeoutError("every job was sent before both new workers ran one")
            step = self.jobs[sent:sent + 3]
            produce_jobs(self.bootstrap, self.topic, step, sessions=sessions, first=sent,
                         models=self.models)
            sent += len(step)
            check()
            time.sleep(0.5)
        produce_jobs(self.bootstrap, self.topic, self.jobs[sent:], sessions=sessions, first=sent,
                     models=self.models)
        self.say(f"three workers run jobs: {self.finished()} done")
        self._slow_redis()

        joining.kill()
        self.say(f"SIGKILLed worker {joining.pid}: {self.finished()} done")

        while True:  # freeze it while it holds a job (asked once it cannot finish one)
            wait_for(f"worker {frozen.pid} to run a job", lambda: bool(
                self.running_under(frozen)), self.timeout_s, check)
            frozen.signal(signal.SIGSTOP)
            held = self.running_under(frozen)
            if held:
                break
            frozen.signal(signal.SIGCONT)
        self.say(f"froze worker {frozen.pid} holding {len(held)} running job(s)")

        def taken_over() -> bool:
            now = self.attempts(list(held))
            return any(now[j][0] > a and f":{frozen.pid}:" not in now[j][1]
                       for j, a in held.items())

        try:
            wait_for("another worker to take over a job of the frozen one", taken_over,
                     self.timeout_s)
        finally:
            frozen.signal(signal.SIGCONT)
        now = self.attempts(list(held))
        self.taken_over = [j for j, a in held.items() if now[j][0] > a]
        self.say(f"woke worker {frozen.pid}: {len(self.taken_over)} of its jobs were taken "
                 f"over meanwhile; {self.finished()} done")

        self._slow_redis()
        with self.postgres.frozen():
            time.sleep(self.lease_s * 1.5)  # the fault itself: every lease runs out
        self.say(f"Postgres frozen for {self.lease_s * 1.5:.1f} s and thawed: "
                 f"{self.finished()} done")
        wait_for("every job's done", lambda: self.finished() == len(self.jobs),
                 self.timeout_s, check)
        self.say(f"all {len(self.jobs)} jobs done")
        # While the workers still run, every partition's commit reaches its end (a
        # stop during a rebalance may leave terminal jobs to a redelivery that skips
        # them: harmless, and not what this checks).
        wait_for("every partition's committed offset to reach its end",
                 lambda: uncommitted_partitions(self.bootstrap, self.topic, self.group) == 0,
                 self.timeout_s, check)
        self.say("every partition committed to its end")

    def _slow_redis(self) -> None:
        """Redis answers nothing for a while (SIGSTOP), then everything at once: the
        workers' event mailboxes fill while the vendors go on streaming."""
        if self.redis is None:
            return
        with self.redis.frozen():
            time.sleep(self.slow_redis_s)
        self.say(f"Redis stopped for {self.slow_redis_s:.1f} s and woken: "
                 f"{self.finished()} done")

    def _check_all(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.kills == 0:
                worker.check()

    def stop(self) -> list[int | None]:
        """Stop the workers still running (SIGTERM: they commit what settled)."""
        return [worker.stop() for worker in self.workers if worker.kills == 0]
