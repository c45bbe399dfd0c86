"""Stream throughput of a worker process: tokens/s into Redis and worker CPU per token.

A baseline for issue 6, with no peer yet. It starts the local stack and a
scripted vendor that streams as fast as it can, then runs
`chat-actors run` as a process and sends batches of concurrent jobs.
It measures the worker's own CPU time (psutil), not wall time.

    bin/chat-actors bench throughput [--concurrency 1,50,200] [--tokens 500]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import confluent_kafka
import psutil
import redis

from actors.adapters import local_stack
from tests.scripted_llm import Reply, ScriptedLLM

ROOT = Path(__file__).resolve().parent.parent


def wait_ready(log: Path, process: subprocess.Popen[bytes], port: int) -> None:
    """Poll the worker's /readyz (its logs are quiet at level warning)."""
    import urllib.error
    import urllib.request

    while True:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)


def run_batch(producer, client, topic: str, jobs: int, worker: psutil.Process) -> dict:
    ids = [f"tp-{uuid.uuid4().hex[:12]}" for _ in range(jobs)]
    cpu0 = sum(worker.cpu_times()[:2])
    started = time.perf_counter()
    for i, job_id in enumerate(ids):
        producer.produce(topic, key=f"s{i}".encode(), value=json.dumps({
            "jobId": job_id, "userId": "bench", "sessionId": f"s-{job_id}",
            "message": "go"}).encode())
    producer.flush(30)
    tokens = 0
    for job_id in ids:
        while not client.exists(f"chat-actors:done:{job_id}"):
            time.sleep(0.01)
        for _, fields in client.xrevrange(f"sse:chat:{job_id}", count=3):
            if fields[b"event"] == b"final":
                tokens += json.loads(fields[b"data"])["usage"]["completionTokens"]
            elif fields[b"event"] == b"error":
                raise RuntimeError(f"job {job_id} failed: {fields[b'data'].decode()}")
    wall = time.perf_counter() - started
    cpu = sum(worker.cpu_times()[:2]) - cpu0
    return {"jobs": jobs, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "cpu_us_per_token": 1e6 * cpu / max(tokens, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-actors bench throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,50,200")
    parser.add_argument("--tokens", type=int, default=500)
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    with local_stack.workdir("chat-actors-throughput-") as workdir:
        kafka, rds, pg = local_stack.start_core(workdir)
        # Distinct tokens: LiteLLM fails a stream that repeats one chunk 100 times.
        llm = ScriptedLLM(default=Reply(tokens=tuple(f"t{i} " for i in range(args.tokens)))).start()
        health_port = local_stack.free_port()
        config = workdir / "tp.toml"
        config.write_text(local_stack.stack_config(
            kafka=kafka.url, redis=rds.url, postgres=pg.url, llm_url=llm.url, sections={
                "kafka": {"fetch_wait_max_ms": 10},
                "llm.models.local": {"context_window": 8192, "max_tokens": 2048},
                "jobs": {"max_in_flight": 1024},
                "health": {"port": health_port},
            }))
        log = workdir / "worker.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "actors.cli", "run", "--config", str(config)], cwd=ROOT,
                stdout=out, stderr=out, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            wait_ready(log, process, health_port)
            worker = psutil.Process(process.pid)
            producer = confluent_kafka.Producer({"bootstrap.servers": kafka.url,
                                                 "log.connection.close": False})
            client = redis.Redis.from_url(rds.url)
            run_batch(producer, client, "chat.request", 2, worker)  # warm up
            print(f"{'concurrent jobs':>15} {'tokens':>8} {'wall s':>7} {'tokens/s':>9} "
                  f"{'worker CPU us/token':>20}")
            for jobs in levels:
                r = run_batch(producer, client, "chat.request", jobs, worker)
                print(f"{r['jobs']:>15} {r['tokens']:>8} {r['wall_s']:>7.2f} "
                      f"{r['tokens_per_s']:>9.0f} {r['cpu_us_per_token']:>20.1f}")
        finally:
            process.terminate()
            process.wait(30)
            llm.stop()
            for service in (pg, rds, kafka):
                service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
