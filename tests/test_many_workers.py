"""Three workers in one consumer group keep every guarantee (contract 6.1, 4.2, 4.11,
4.13) while one joins late, one is SIGKILLed, one is frozen past its leases and the
session timeout and then wakes, and Postgres is frozen past every lease."""

from __future__ import annotations

import uuid

import redis

from actors.adapters.kafka import ensure_topics
from tests.invariants import NumberedLLM, uncommitted_partitions, verify
from tests.many_workers import Choreography, WorkerProcess
from tests.scripted_llm import Reply
from tools import local_stack

LEASE_S = 3


def test_three_workers_joining_killed_and_frozen_answer_every_job_once(stack, tmp_path):
    llm = NumberedLLM()
    # Each answer streams for three seconds, a session's six one after another:
    # every step finds jobs running.
    llm.default = Reply(tokens=tuple(f"w{i} " for i in range(30)), token_delay_s=0.1)
    llm.start()
    tag = uuid.uuid4().hex[:8]
    topic = f"many.request.{tag}"
    config = tmp_path / "many.toml"
    config.write_text(local_stack.stack_config(
        kafka=stack.kafka.url, redis=stack.redis.url, postgres=stack.postgres.url,
        llm_url=llm.url, sections={
            "kafka": {"request_topic": topic, "control_topic": f"many.control.{tag}",
                      "dlq_topic": f"many.dlq.{tag}", "group_id": f"many-{tag}",
                      "partitions": 6},
            # Room for every job: the intake never pauses its partitions here. (With
            # librdkafka 2.16 a consumer whose partitions are paused and resumed often can
            # stop fetching for good; see the issue 14 note. That is another test's case.)
            "jobs": {"lease_s": LEASE_S, "max_in_flight": 256},
            "shutdown": {"grace_s": 5}, "log": {"level": "info"}}))
    ensure_topics(stack.kafka.url, {}, [topic, f"many.control.{tag}", f"many.dlq.{tag}"], 6)
    rds = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    jobs = [f"many-{tag}-{i}" for i in range(120)]
    run = Choreography(
        workers=[WorkerProcess(config, tmp_path / f"worker-{n}.log") for n in range(3)],
        jobs=jobs, bootstrap=stack.kafka.url, topic=topic, rds=rds,
        pg_url=stack.postgres.url, postgres=stack.postgres, lease_s=LEASE_S, timeout_s=120,
        group=f"many-{tag}")
    try:
        run.run()
    finally:
        exit_codes = run.stop()
        llm.stop()
    verdict = verify(jobs, rds, stack.postgres.url, llm)
    rds.close()
    verdict.uncommitted = uncommitted_partitions(stack.kafka.url, topic, f"many-{tag}")
    print(verdict.report())
    assert verdict.problems() == 0, verdict.report()
    assert verdict.statuses == {"completed": len(jobs)}
    # The frozen worker's jobs were run again; it woke, and still stopped cleanly.
    assert run.taken_over and exit_codes == [0, 0]
    assert [w.crashes for w in run.workers] == [0, 0, 0]
