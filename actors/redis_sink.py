"""redis_sink: StreamEvents -> pipelined XADDs, a job's tokens coalesced per batch.

While one pipeline is in flight, new events queue in the mailbox (actors/sinks.py),
and the next batch merges each job's adjacent tokens into one entry. Under load
entries grow; when idle every token leaves at once. `seq` is assigned here, per
(job, attempt), so it counts the entries the client sees.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

import msgspec
import trio

from actors.backoff import Backoff, DependencyHealth, retry_transient
from actors.errors import PermanentError
from actors.ports import EventWriter
from actors.sinks import run_sink
from messages.mailboxes import EventEmitted
from messages.ports import StreamEntry
from messages.wire import Done, Reasoning, Started, StreamEvent, Token, event_data, now_ms

log = logging.getLogger("chat_actors.redis_sink")

JobKey = tuple[str, int]


def coalesce(batch: list[EventEmitted], next_seq: dict[JobKey, int]) -> list[StreamEntry]:
    """Turn a batch into stream entries, merging each job's adjacent tokens (and its
    adjacent reasoning: the two are never merged into each other)."""
    entries: list[StreamEntry] = []
    # job -> (entry index, the run's event type, texts)
    open_run: dict[JobKey, tuple[int, type[Token] | type[Reasoning], list[str]]] = {}

    def close_run(key: JobKey) -> None:
        index, kind, texts = open_run.pop(key)
        if len(texts) > 1:
            entry = entries[index]
            merged = msgspec.structs.replace(entry.event, data=event_data(kind(text="".join(texts))))
            entries[index] = StreamEntry(key=entry.key, event=merged)

    for message in batch:
        job = message.job
        key = (job.job_id, job.attempt)
        body = message.body
        run = open_run.get(key)
        if run is not None and isinstance(body, (Token, Reasoning)) and type(body) is run[1]:
            run[2].append(body.text)
            continue
        if run is not None:
            close_run(key)
        if message.first_seq is not None and key not in next_seq:
            next_seq[key] = message.first_seq
        seq = next_seq.get(key, 0)
        next_seq[key] = seq + 1
        entries.append(StreamEntry(key=job.stream_key, event=StreamEvent(
            event=body.EVENT, job_id=job.job_id, user_id=job.user_id,
            session_id=job.session_id, attempt=job.attempt, seq=seq, ts=now_ms(),
            data=event_data(body))))
        if isinstance(body, (Token, Reasoning)):
            open_run[key] = (len(entries) - 1, type(body), [body.text])
        if isinstance(body, Done):
            next_seq.pop(key, None)
        elif isinstance(body, Started) and job.attempt > 1:
            # The attempt before it is over (a restart in this worker): its count goes.
            next_seq.pop((job.job_id, job.attempt - 1), None)
    for key in list(open_run):
        close_run(key)
    return entries


Superseded = Callable[[str, int], None]


def _isolating(writer: EventWriter, health: DependencyHealth | None,
               on_superseded: Superseded | None) -> Callable[[list[StreamEntry]], Awaitable[None]]:
    """A write that never stops the sink for one entry Redis refuses for good (say a
    key of another type where the job's stream should be): the batch is written again
    entry by entry and a refused entry is dropped, logged and counted. An attempt
    whose entries were refused because a later attempt holds the job is stopped."""

    def superseded(attempts: set[tuple[str, int]]) -> None:
        for job_id, attempt in sorted(attempts):
            log.warning("job %s: attempt %d superseded; its events are not written",
                        job_id, attempt)
            if on_superseded is not None:
                on_superseded(job_id, attempt)

    async def write(entries: list[StreamEntry]) -> None:
        try:
            superseded(await writer.write(entries))
        except PermanentError:
            for entry in entries:
                try:
                    superseded(await retry_transient(
                        partial(writer.write, [entry]), what="XADD of 1 event", log=log,
                        health=health, dependency="redis"))
                except PermanentError as exc:
                    log.error("job %s: redis refused its %s event for good (%s); dropped",
                              entry.event.job_id, entry.event.event, exc)

    return write


async def run_redis_sink(inbox: trio.MemoryReceiveChannel[EventEmitted], writer: EventWriter,
                         *, batch_max: int, backoff: Backoff | None = None,
                         health: DependencyHealth | None = None,
                         on_superseded: Superseded | None = None,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    next_seq: dict[JobKey, int] = {}
    await run_sink(inbox, partial(coalesce, next_seq=next_seq),
                   _isolating(writer, health, on_superseded),
                   what="XADD of {n} events", dependency="redis", batch_max=batch_max, log=log,
                   backoff=backoff, health=health, task_status=task_status)
