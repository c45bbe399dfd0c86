"""pg_sink: job and message records -> one transaction per batch (group commit).

One autocommit transaction per record costs ~3.6 ms (an fsync each); a batch
shares that fsync. Every write checks that this worker still holds the job's
lease (`lease_holder`).

A record the server refuses (a PermanentError: a value it cannot store, a
constraint, a bug of ours) never stops the sink: the batch is written again
record by record, and a refused record is replaced by its minimal form (the
terminal status, no content) so the job still settles; its receipt says why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec
import trio

from actors.backoff import Backoff, DependencyHealth, retry_transient
from actors.errors import PermanentError
from actors.ports import RecordWriter
from actors.sinks import run_sink
from messages.mailboxes import JobFinished, JobRejected, PgSinkMessage

log = logging.getLogger("chat_actors.pg_sink")


def minimal(record: PgSinkMessage, why: str) -> PgSinkMessage:
    """The record without the content a server may refuse: status and ids only."""
    match record:
        case JobFinished():
            return msgspec.structs.replace(
                record, status="failed", error=f"internal: {why}"[:1000], partial=False,
                user_message="", answer="", messages=False)
        case JobRejected():
            return msgspec.structs.replace(record, error="bad input (its detail was refused)")


def _mark_superseded(batch: Sequence[PgSinkMessage], job_ids: set[str]) -> None:
    for record in batch:
        if record.job_id in job_ids and record.receipt is not None:
            log.warning("job %s: attempt %s superseded; its terminal record was not written",
                        record.job_id, getattr(record, "attempt", "?"))
            record.receipt.superseded = True


class _Isolating:
    """Writes a batch; on a refusal, each record alone, the refused in minimal form."""

    def __init__(self, writer: RecordWriter, lease_holder: str,
                 health: DependencyHealth | None) -> None:
        self._writer = writer
        self._lease_holder = lease_holder
        self._health = health

    async def write(self, batch: Sequence[PgSinkMessage]) -> dict[int, str] | None:
        try:
            superseded = await self._writer.write_records(batch, self._lease_holder)
        except PermanentError as exc:
            if len(batch) == 1:
                return {0: await self._write_minimal(batch[0], exc)}
            refused: dict[int, str] = {}
            for index, record in enumerate(batch):
                try:
                    await self._retry([record])
                except PermanentError as alone:
                    refused[index] = await self._write_minimal(record, alone)
            return refused
        if superseded:
            _mark_superseded(batch, superseded)
        return None

    async def _retry(self, records: Sequence[PgSinkMessage]) -> None:
        superseded = await retry_transient(
            lambda: self._writer.write_records(records, self._lease_holder),
            what="write of one record", log=log, health=self._health, dependency="postgres")
        _mark_superseded(records, superseded)

    async def _write_minimal(self, record: PgSinkMessage, refusal: PermanentError) -> str:
        """Write the refused record's minimal form; return why it was needed."""
        why = f"postgres refused the record of job {record.job_id} ({refusal})"
        log.error("%s; writing its minimal form", why)
        try:
            await self._retry([minimal(record, "postgres refused the job's record")])
        except PermanentError as exc:
            log.error("job %s: even its minimal record was refused (%s)", record.job_id, exc)
        return why


async def run_pg_sink(inbox: trio.MemoryReceiveChannel[PgSinkMessage], writer: RecordWriter,
                      *, lease_holder: str, batch_max: int, backoff: Backoff | None = None,
                      health: DependencyHealth | None = None,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    isolating = _Isolating(writer, lease_holder, health)
    await run_sink(inbox, list[PgSinkMessage], isolating.write,
                   what="write of {n} records", dependency="postgres", batch_max=batch_max,
                   log=log, backoff=backoff, health=health, task_status=task_status)
