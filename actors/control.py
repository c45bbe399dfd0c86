"""control: chat.control -> the job registry.

Every worker reads every control message: the control consumer assigns itself
all partitions (no group membership), starting `tombstone_ttl_s` back in time
so a cancel sent while this worker was starting is not missed.
"""

from __future__ import annotations

import logging
from typing import assert_never

import trio

from actors.backoff import DependencyHealth
from actors.polling import Poller
from actors.ports import Source
from actors.registry import CancelOutcome, JobRegistry
from messages.mailboxes import Delivery
from messages.wire import BadInput, CancelRequested, decode_control

log = logging.getLogger("chat_actors.control")

BATCH = 256


class ControlStats:
    def __init__(self) -> None:
        self.applied = 0
        self.bad = 0


def apply(delivery: Delivery, registry: JobRegistry, stats: ControlStats) -> None:
    """One control message: decode it and apply it to the registry."""
    try:
        message = decode_control(delivery.value)
    except BadInput as problem:
        stats.bad += 1
        log.warning("bad control message at %s[%d]@%d: %s", delivery.topic,
                    delivery.partition, delivery.offset, problem)
        return
    match message:
        case CancelRequested(job_id=job_id, user_id=user_id, reason=reason):
            outcome = registry.cancel(job_id, user_id, reason)
            stats.applied += 1
            if outcome is CancelOutcome.FOREIGN:
                log.warning("cancel of job %s by %s ignored: the job is another user's",
                            job_id, user_id)
            else:
                log.info("cancel of job %s by %s: %s", job_id, user_id, outcome.value)
        case _:
            assert_never(message)


async def run_control(source: Source, registry: JobRegistry, *,
                      stats: ControlStats | None = None, health: DependencyHealth | None = None,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    stats = stats or ControlStats()
    poller = Poller(source, what="control", log=log, health=health)
    task_status.started()
    try:
        while True:
            for delivery in await poller.poll(BATCH):
                try:
                    apply(delivery, registry, stats)
                except Exception:  # a bug of ours: this message only, never every worker
                    stats.bad += 1
                    log.exception("control message at %s[%d]@%d not applied: unexpected "
                                  "error", delivery.topic, delivery.partition, delivery.offset)
    finally:
        with trio.CancelScope(shield=True):
            await source.close()
