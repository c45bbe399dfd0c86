"""control: chat.control -> the job registry.

Every worker reads every control message: the control consumer assigns itself
all partitions (no group membership), starting `tombstone_ttl_s` back in time
so a cancel sent while this worker was starting is not missed.
"""

from __future__ import annotations

import logging

import trio

from actors.backoff import Backoff
from actors.errors import TransientError
from actors.ports import RequestSource
from actors.registry import CancelOutcome, JobRegistry
from messages.wire import BadInput, CancelRequested, decode_control

log = logging.getLogger("chat_actors.control")

POLL_TIMEOUT_S = 0.1


class ControlStats:
    def __init__(self) -> None:
        self.applied = 0
        self.bad = 0


async def run_control(source: RequestSource, registry: JobRegistry, *,
                      stats: ControlStats | None = None,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    stats = stats or ControlStats()
    backoff = Backoff(cap_s=5.0)
    failures = 0
    task_status.started()
    try:
        while True:
            try:
                batch = await source.poll(256, POLL_TIMEOUT_S)
                failures = 0
            except TransientError as exc:
                failures += 1
                wait = backoff.delay(failures)
                log.warning("control poll failed (%s); retry in %.2fs", exc, wait)
                await trio.sleep(wait)
                continue
            for delivery in batch:
                try:
                    message = decode_control(delivery.value)
                except BadInput as problem:
                    stats.bad += 1
                    log.warning("bad control message at %s[%d]@%d: %s", delivery.topic,
                                delivery.partition, delivery.offset, problem)
                    continue
                match message:
                    case CancelRequested(job_id=job_id, user_id=user_id, reason=reason):
                        outcome = registry.cancel(job_id, user_id, reason)
                        stats.applied += 1
                        if outcome is CancelOutcome.FOREIGN:
                            log.warning("cancel of job %s by %s ignored: not the owner",
                                        job_id, user_id)
                        else:
                            log.info("cancel of job %s by %s: %s", job_id, user_id,
                                     outcome.value)
    finally:
        with trio.CancelScope(shield=True):
            await source.close()
