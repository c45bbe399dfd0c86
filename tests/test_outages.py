"""Dependency outages (contract 6.7): retry with backoff, not ready meanwhile, and every
job finishes with a contiguous event sequence and exactly one `done`."""

from __future__ import annotations

import os
import signal

import trio

from tests.helpers import events_of, produce, readyz, request, until, wait_calls, worker_running
from tests.scripted_llm import Reply

STREAM = Reply(tokens=tuple(f"w{i} " for i in range(20)), token_delay_s=0.05)


def assert_contiguous(events: list[dict]) -> None:
    by_attempt: dict[str, list[int]] = {}
    for e in events:
        by_attempt.setdefault(e["attempt"], []).append(int(e["seq"]))
    for seqs in by_attempt.values():
        assert seqs == list(range(len(seqs)))  # no gap, no duplicate
    assert [e["event"] for e in events].count("done") == 1


async def test_redis_unreachable_mid_stream(make_config, stack, llm, rds):
    config, _ = make_config(environ={"CHAT_ACTORS__REDIS__SOCKET_TIMEOUT_S": "0.5"})
    llm.default = STREAM
    req = request("through an outage")
    async with worker_running(config) as worker:
        assert (await readyz(worker.health_port))[0] == 200
        produce(config, req)
        await wait_calls(llm, lambda calls: calls and calls[0].tokens_sent >= 3, 30)
        os.kill(stack.redis.pid, signal.SIGSTOP)
        try:
            await until(lambda: worker.health.failures["redis"] >= 2)
            status, report = await readyz(worker.health_port)
            assert status == 503 and "redis" in report["down"]
        finally:
            os.kill(stack.redis.pid, signal.SIGCONT)
        events = await events_of(rds, config, req["jobId"])
        await until(lambda: worker.health.ready())
    assert_contiguous(events)
    tokens = "".join(e["data"]["text"] for e in events if e["event"] == "token")
    assert tokens == events[-2]["data"]["text"] == "".join(f"w{i} " for i in range(20))
    assert events[-1]["data"]["status"] == "completed" and len(llm.calls) == 1


async def test_a_slow_redis_is_not_the_vendors_stall(make_config, stack, llm, rds):
    """Redis stops answering mid-stream for three idle timeouts while the vendor streams
    faster than anything drains: the job's event mailbox fills and reading pauses. That
    is our backpressure, not the vendor's silence: the healthy stream is neither hung
    up on nor paid for again (issue 36, item 3), and the answer ends whole."""
    config, _ = make_config(environ={"CHAT_ACTORS__REDIS__SOCKET_TIMEOUT_S": "0.5",
                                     "CHAT_ACTORS__JOBS__IDLE_TIMEOUT_S": "1",
                                     "CHAT_ACTORS__LLM__MODELS__SCRIPTED__MAX_TOKENS": "4000"})
    # A token a millisecond: each its own event, so the job's event mailbox (1,024)
    # fills about a second into the outage and its events wait two more.
    tokens = tuple(f"w{i} " for i in range(3000))
    llm.default = Reply(tokens=tokens, token_delay_s=0.001)
    req = request("a long answer")
    async with worker_running(config) as worker:
        produce(config, req)
        await wait_calls(llm, lambda calls: calls and calls[0].tokens_sent >= 3, 30)
        os.kill(stack.redis.pid, signal.SIGSTOP)
        try:
            await until(lambda: worker.health.failures["redis"] >= 6)  # 3 s: 3 idle timeouts
        finally:
            os.kill(stack.redis.pid, signal.SIGCONT)
        events = await events_of(rds, config, req["jobId"])
    assert len(llm.calls) == 1 and not llm.calls[0].disconnected
    assert [e["event"] for e in events if e["event"] == "provider"] == []
    assert events[-2]["data"]["text"] == "".join(tokens)
    assert_contiguous(events)


async def test_postgres_restarted_mid_job(config, stack, llm, rds):
    llm.default = STREAM
    req = request("through a restart")
    async with worker_running(config) as worker:
        produce(config, req)
        await wait_calls(llm, lambda calls: calls and calls[0].tokens_sent >= 3, 30)
        stack.postgres.stop()
        try:
            await until(lambda: worker.health.failures["postgres"] >= 1)
            assert not worker.health.ready()
        finally:
            await trio.to_thread.run_sync(stack.restart_postgres)
        events = await events_of(rds, config, req["jobId"])
    assert_contiguous(events)
    assert events[-1]["data"]["status"] == "completed" and len(llm.calls) == 1
    import psycopg

    with psycopg.connect(stack.postgres.url) as conn:
        row = conn.execute("SELECT status, attempt FROM llm_jobs WHERE job_id = %s",
                           (req["jobId"],)).fetchone()
    assert row == ("completed", 1)


async def test_a_job_finishes_while_the_broker_is_unreachable(config, stack, llm, rds):
    llm.default = STREAM
    first = request("during the pause")
    second = request("after the pause")
    async with worker_running(config):
        produce(config, first)
        await wait_calls(llm, lambda calls: calls and calls[0].tokens_sent >= 3, 30)
        os.kill(stack.kafka.pid, signal.SIGSTOP)
        try:
            # Redis and Postgres are enough to finish a job already admitted.
            events = await events_of(rds, config, first["jobId"])
        finally:
            os.kill(stack.kafka.pid, signal.SIGCONT)
        produce(config, second)
        await events_of(rds, config, second["jobId"])
    assert_contiguous(events)
    assert events[-1]["data"]["status"] == "completed"
    # Its offset was committed once the broker was back: a new worker runs nothing again.
    async with worker_running(config):
        third = request("third")
        produce(config, third)
        await events_of(rds, config, third["jobId"])
    assert [c.messages[-1]["content"] for c in llm.calls] == [
        "during the pause", "after the pause", "third"]


async def assert_named_in_readyz(worker, dependency: str, state: str) -> None:
    """Once the worker has retried `dependency` twice, /readyz is 503 naming its state."""
    await until(lambda: worker.health.failures[dependency] >= 2)
    status, report = await readyz(worker.health_port)
    assert status == 503 and state in report["down"][dependency]


async def test_redis_out_of_memory_is_waited_out_and_named_in_readyz(config, llm, rds):
    # OOM (like MISCONF or LOADING) is a state the server passes through: the events
    # wait for it, /readyz names it, and the worker goes on. It used to kill the sink.
    llm.default = STREAM
    req = request("through an out-of-memory Redis")
    policy = rds.config_get("maxmemory-policy")["maxmemory-policy"]
    async with worker_running(config) as worker:
        rds.config_set("maxmemory-policy", "noeviction")
        rds.config_set("maxmemory", 1)
        try:
            produce(config, req)
            await assert_named_in_readyz(worker, "redis", "OutOfMemoryError")
        finally:
            rds.config_set("maxmemory", 0)
            rds.config_set("maxmemory-policy", policy)
        events = await events_of(rds, config, req["jobId"])
        await until(lambda: worker.health.ready())
    assert_contiguous(events)
    assert events[-1]["data"]["status"] == "completed"


async def test_postgres_read_only_during_a_failover_is_waited_out(config, llm, rds, db):
    llm.default = STREAM
    req = request("through a read-only Postgres")
    async with worker_running(config) as worker:
        db.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        db.execute("SELECT pg_reload_conf()")
        try:
            produce(config, req)
            await assert_named_in_readyz(worker, "postgres", "ReadOnlySqlTransaction")
        finally:
            db.execute("SET default_transaction_read_only = off")
            db.execute("ALTER SYSTEM RESET default_transaction_read_only")
            db.execute("SELECT pg_reload_conf()")
        events = await events_of(rds, config, req["jobId"])
    assert events[-1]["data"]["status"] == "completed"


async def test_hung_queries_end_at_the_statement_timeout_and_never_starve_the_pool(stack, db):
    # A query that waits forever (here on a lock; in life on a frozen server) used to
    # hold its pooled connection and its thread's limiter token for good: four of them
    # blocked every later Postgres call of the worker.
    from actors.adapters.postgres import Postgres
    from actors.errors import TransientError

    store = Postgres(dsn=stack.postgres.url, pool_size=2, statement_timeout_s=0.5)
    await store.migrate()
    db.execute("CREATE TABLE IF NOT EXISTS hung_probe (id int PRIMARY KEY)")
    db.execute("INSERT INTO hung_probe VALUES (1) ON CONFLICT DO NOTHING")
    failures: list[str] = []

    async def blocked() -> None:
        try:
            await store.run(lambda conn: conn.execute(
                "SELECT id FROM hung_probe WHERE id = 1 FOR UPDATE").fetchone())
        except TransientError as exc:
            failures.append(str(exc))

    with db.transaction():
        db.execute("SELECT id FROM hung_probe WHERE id = 1 FOR UPDATE")  # held meanwhile
        async with trio.open_nursery() as nursery:
            for _ in range(4):  # twice the pool
                nursery.start_soon(blocked)
    assert len(failures) == 4 and all("statement timeout" in f for f in failures)
    # The pool and its limiter are whole again.
    assert await store.run(lambda conn: conn.execute("SELECT 42").fetchone()) == (42,)
    with store._connect() as conn:  # a peer that vanished is found by TCP keepalive
        parameters = conn.info.get_parameters()
    assert (parameters["keepalives"], parameters["keepalives_idle"]) == ("1", "30")
    store.close()


async def test_a_worker_frozen_mid_claim_holds_its_locks_no_longer_than_the_timeout(stack):
    """A worker frozen (SIGSTOP, a paused VM) between two statements of a claim held
    the rows it locked for as long as it stayed frozen: every other worker's claim of
    those jobs timed out and was retried, so nobody could take the jobs over. The
    server now ends a transaction left idle past the statement timeout."""
    from actors.adapters.postgres import Postgres
    from actors.errors import TransientError
    from messages.ports import Claimed, ClaimOrder

    frozen = Postgres(dsn=stack.postgres.url, pool_size=1, statement_timeout_s=1)
    other = Postgres(dsn=stack.postgres.url, pool_size=1, statement_timeout_s=20)
    await frozen.migrate()
    job_id = f"frozen-{os.getpid()}-{trio.current_time():.0f}"
    order = ClaimOrder(job_id=job_id, user_id="u", session_id="s", trace_id="t", mode="gen",
                       model="m", provider="p")
    thawed = trio.Event()
    outcome: list[Exception] = []

    def claim_then_freeze(conn):
        conn.execute("INSERT INTO llm_jobs (job_id, user_id, session_id, status, attempt) "
                     "VALUES (%s, 'u', 's', 'running', 1)", (job_id,))
        trio.from_thread.run(thawed.wait)  # frozen here, its insert not committed

    async def freeze() -> None:
        try:
            await frozen.run(claim_then_freeze)
        except TransientError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(freeze)
        await until(lambda: bool(_locks_held(stack, job_id)), 10)
        (claimed,) = await other.claim_many([order], lease_holder="w2", lease_s=60)
        thawed.set()
    assert isinstance(claimed, Claimed) and claimed.attempt == 1  # the frozen one's was undone
    # The frozen worker learns its transaction is gone, as a failure worth a retry.
    assert len(outcome) == 1 and "idle-in-transaction timeout" in str(outcome[0])
    frozen.close()
    other.close()


def _locks_held(stack, job_id: str) -> bool:
    """Some session sits idle in a transaction that inserted `job_id`."""
    import psycopg

    with psycopg.connect(stack.postgres.url, autocommit=True) as conn:
        return bool(conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE state = 'idle in transaction' "
            "AND query LIKE %s", ("%INSERT INTO llm_jobs%",)).fetchone())
