"""The pg sink never dies for one record: a record Postgres refuses is written in its
minimal form (failed, no content) and its receipt says why; the others are written.
A record of a superseded attempt writes nothing, and its receipt says so."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from functools import partial

import msgspec
import trio

from actors.adapters.postgres import Postgres
from actors.errors import PermanentError
from actors.pg_sink import run_pg_sink
from messages.mailboxes import JobFinished, JobRejected, PgSinkMessage, Receipt
from messages.ports import Claimed


class RefusingWriter:
    """A RecordWriter whose server refuses any record with "poison" in its answer."""

    def __init__(self) -> None:
        self.written: list[PgSinkMessage] = []
        self.batches = 0

    async def write_records(self, records: Sequence[PgSinkMessage], lease_holder: str) -> set[str]:
        self.batches += 1
        if any(isinstance(r, JobFinished) and "poison" in r.answer for r in records):
            raise PermanentError("postgres: DataError: cannot store this", code="postgres")
        self.written += records
        return set()


def finished(job_id: str, answer: str) -> JobFinished:
    return JobFinished(job_id=job_id, user_id="u", session_id="s", status="completed",
                       attempt=1, model="m", provider="p", prompt_tokens=1, completion_tokens=1,
                       cost_usd=0.0, ttft_ms=1, latency_ms=2, error=None, partial=False,
                       user_message="q", user_tokens=1, answer=answer, receipt=Receipt())


async def test_a_refused_record_is_written_minimal_and_the_rest_as_they_are():
    writer = RefusingWriter()
    batch: list[PgSinkMessage] = [finished("a", "fine"), finished("b", "poison"),
                                  JobRejected(job_id="c", user_id="u", session_id="s",
                                              error="bad", receipt=Receipt()),
                                  finished("d", "fine too")]
    send, receive = trio.open_memory_channel[PgSinkMessage](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_pg_sink, receive, writer, lease_holder="w",
                                    batch_max=10))
        for record in batch:
            send.send_nowait(record)  # one batch: all queued before the sink wakes
        reasons = [await record.receipt.wait() for record in batch if record.receipt]
        send.close()
    assert [r.job_id for r in writer.written] == ["a", "b", "c", "d"]  # in place
    minimal = writer.written[1]
    assert isinstance(minimal, JobFinished)
    assert (minimal.status, minimal.answer, minimal.user_message, minimal.messages) == (
        "failed", "", "", False)
    assert minimal.error is not None and minimal.error.startswith("internal: ")
    assert reasons[0] is None and reasons[2] is None and reasons[3] is None
    assert reasons[1] is not None and "job b" in reasons[1]


async def test_a_lone_refused_record_does_not_stop_the_sink():
    writer = RefusingWriter()
    send, receive = trio.open_memory_channel[PgSinkMessage](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_pg_sink, receive, writer, lease_holder="w",
                                    batch_max=10))
        first, second = finished("x", "poison"), finished("y", "ok")
        await send.send(first)
        assert first.receipt is not None and await first.receipt.wait() is not None
        await send.send(second)
        assert second.receipt is not None and await second.receipt.wait() is None
        send.close()
    assert [r.job_id for r in writer.written] == ["x", "y"]


async def test_a_terminal_record_of_a_superseded_attempt_writes_nothing(stack, db):
    # Attempt 1's lease ran out (its worker froze) and attempt 2 took the job, here on
    # the same worker. Attempt 1's late record must not become the job's row, history
    # or budget settlement (contract 6.11); the sink's receipt says it was superseded.
    store = Postgres(dsn=stack.postgres.url, pool_size=2)
    await store.migrate()
    job_id = f"fence-{uuid.uuid4().hex[:8]}"

    async def claim() -> int:
        claimed = await store.claim(job_id=job_id, user_id="u", session_id="s", trace_id="t",
                                    mode="gen", model="local", provider="openai",
                                    lease_holder="w", lease_s=30)
        assert isinstance(claimed, Claimed)
        return claimed.attempt

    assert await claim() == 1
    db.execute("UPDATE llm_jobs SET lease_until = now() - interval '1 s' WHERE job_id = %s",
               (job_id,))
    assert await claim() == 2
    stale = msgspec.structs.replace(finished(job_id, "stale answer"), attempt=1)
    send, receive = trio.open_memory_channel[PgSinkMessage](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_pg_sink, receive, store, lease_holder="w", batch_max=10))
        send.send_nowait(stale)
        assert stale.receipt is not None and await stale.receipt.wait() is None
        assert stale.receipt.superseded
        row = db.execute("SELECT status, attempt FROM llm_jobs WHERE job_id = %s",
                         (job_id,)).fetchone()
        assert row == ("running", 2)
        assert db.execute("SELECT count(*) FROM llm_messages WHERE job_id = %s",
                          (job_id,)).fetchone() == (0,)
        current = msgspec.structs.replace(finished(job_id, "fresh answer"), attempt=2)
        send.send_nowait(current)
        assert current.receipt is not None and await current.receipt.wait() is None
        assert not current.receipt.superseded
        send.close()
    assert db.execute("SELECT status, attempt FROM llm_jobs WHERE job_id = %s",
                      (job_id,)).fetchone() == ("completed", 2)
    assert [r[0] for r in db.execute("SELECT content FROM llm_messages WHERE job_id = %s "
                                     "ORDER BY id", (job_id,))] == ["q", "fresh answer"]
    store.close()
