"""The pg sink never dies for one record: a record Postgres refuses is written in its
minimal form (failed, no content) and its receipt says why; the others are written."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import trio

from actors.errors import PermanentError
from actors.pg_sink import run_pg_sink
from messages.mailboxes import JobFinished, JobRejected, PgSinkMessage, Receipt


class RefusingWriter:
    """A RecordWriter whose server refuses any record with "poison" in its answer."""

    def __init__(self) -> None:
        self.written: list[PgSinkMessage] = []
        self.batches = 0

    async def write_records(self, records: Sequence[PgSinkMessage], lease_holder: str) -> None:
        self.batches += 1
        if any(isinstance(r, JobFinished) and "poison" in r.answer for r in records):
            raise PermanentError("postgres: DataError: cannot store this", code="postgres")
        self.written += records


def finished(job_id: str, answer: str) -> JobFinished:
    return JobFinished(job_id=job_id, user_id="u", session_id="s", status="completed",
                       model="m", provider="p", prompt_tokens=1, completion_tokens=1,
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
