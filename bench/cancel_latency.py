"""Cancel latency: a cancel produced to chat.control -> `done{cancelled}` readable in Redis.

Starts the local stack (Tansu, Redis, Postgres), a scripted OpenAI-compatible
vendor streaming slowly, and a worker in this process. For each of N jobs it
waits for the first token, produces the owner's cancel, and times until the
job's `done` arrives on its stream. Prints p50/p90/p99/max.

    bin/chat-actors bench cancel_latency [--jobs 100] [--fetch-wait-ms 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from functools import partial
from pathlib import Path

import confluent_kafka
import redis
import trio

from actors.adapters import local_stack
from actors.supervisor import run_worker
from config import load_config
from tests.scripted_llm import Reply, ScriptedLLM


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def one_cancel(producer, client, config, user: str) -> float:
    job_id = f"bench-{uuid.uuid4().hex[:12]}"
    key = config.stream.key_template.replace("{job_id}", job_id)
    producer.produce(config.kafka.request_topic, key=b"bench", value=json.dumps({
        "jobId": job_id, "userId": user, "sessionId": f"s-{job_id}",
        "message": "stream until I stop you"}).encode())
    producer.flush(10)
    after = "0-0"
    while True:  # wait for the first token: the job is running and streaming
        entries = client.xread({key: after}, block=1000) or []
        events = [(i, f["event"]) for _, es in entries for i, f in es]
        if events:
            after = events[-1][0]
        if any(kind == "token" for _, kind in events):
            break
    started = time.perf_counter()
    producer.produce(config.kafka.control_topic, key=job_id.encode(), value=json.dumps({
        "type": "cancel", "jobId": job_id, "userId": user, "reason": "bench"}).encode())
    producer.flush(10)
    while True:
        for _, entries in client.xread({key: after}, block=1000) or []:
            for entry_id, fields in entries:
                after = entry_id
                if fields["event"] == "done":
                    if json.loads(fields["data"])["status"] != "cancelled":
                        raise RuntimeError(f"job {job_id} ended {fields['data']}")
                    return time.perf_counter() - started


async def bench(jobs: int, fetch_wait_ms: int, workdir: Path) -> list[float]:
    kafka, rds, pg = local_stack.start_core(workdir)
    # Distinct tokens: LiteLLM fails a stream that repeats one chunk 100 times.
    llm = ScriptedLLM(default=Reply(tokens=tuple(f"t{i} " for i in range(2000)),
                                    token_delay_s=0.01)).start()
    try:
        config_path = workdir / "bench.toml"
        config_path.write_text(local_stack.stack_config(
            kafka=kafka.url, redis=rds.url, postgres=pg.url, llm_url=llm.url,
            sections={"kafka": {"fetch_wait_max_ms": fetch_wait_ms}}))
        config = load_config(config_path, environ={})
        producer = confluent_kafka.Producer({"bootstrap.servers": kafka.url, "linger.ms": 0,
                                             "log.connection.close": False})
        client = redis.Redis.from_url(rds.url, decode_responses=True)
        latencies: list[float] = []
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            await nursery.start(partial(run_worker, config, stop=stop, handle_signals=False))
            for i in range(jobs):
                latencies.append(await trio.to_thread.run_sync(
                    one_cancel, producer, client, config, f"user{i % 7}"))
            stop.set()
        client.close()
        return latencies
    finally:
        llm.stop()
        for service in (pg, rds, kafka):
            service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-actors bench cancel_latency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100, help="cancels to time (default 100)")
    parser.add_argument("--fetch-wait-ms", type=int, default=10,
                        help="kafka.fetch_wait_max_ms of the worker (default 10)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    with local_stack.workdir("chat-actors-bench-") as workdir:
        latencies = trio.run(bench, args.jobs, args.fetch_wait_ms, workdir)
    ms = [1000 * x for x in latencies]
    print(f"cancel latency, control produce -> done{{cancelled}} in Redis, {len(ms)} jobs, "
          f"fetch.wait.max.ms={args.fetch_wait_ms}:")
    print(f"  p50 {percentile(ms, 50):7.1f} ms   p90 {percentile(ms, 90):7.1f} ms   "
          f"p99 {percentile(ms, 99):7.1f} ms   max {max(ms):7.1f} ms   "
          f"mean {statistics.fmean(ms):7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
