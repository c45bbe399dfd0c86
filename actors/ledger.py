"""ledger: the budget ledger's old windows deleted, by every worker (actors/job/budget.py
takes and settles the holds in it)."""

from __future__ import annotations

import logging

import trio

from actors.errors import TransientError
from actors.worker import Worker

log = logging.getLogger("chat_actors.budget")

PRUNE_EVERY_S = 600.0


async def prune_ledger(worker: Worker, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Delete ledger windows nothing counts in any more, every PRUNE_EVERY_S. Every
    worker does it; the deletes are idempotent and cheap on the primary key."""
    task_status.started()
    while True:
        try:
            pruned = await worker.store.prune_ledger(period=worker.config.budgets.period)
        except TransientError as exc:
            log.warning("budget ledger not pruned (%s); trying again later", exc)
        else:
            if pruned:
                log.info("budget ledger: %d old window(s) pruned", pruned)
        await trio.sleep(PRUNE_EVERY_S)
