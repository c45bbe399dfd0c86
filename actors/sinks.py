"""The loop both sinks run: drain the mailbox into a batch, write it (retrying a
transient failure until the dependency is back), then set the batch's receipts.

There is no flush timer: while one batch is being written, new messages queue
in the bounded mailbox, which pushes back on the conversations; the next batch
is whatever queued meanwhile. Under load batches grow; when idle every message
leaves at once. A message is never dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Protocol, TypeVar

import trio

from actors.backoff import Backoff, DependencyHealth, retry_transient
from actors.channels import ready
from messages.mailboxes import Receipt


class WithReceipt(Protocol):
    @property
    def receipt(self) -> Receipt | None: ...


M = TypeVar("M", bound=WithReceipt)
P = TypeVar("P")


async def run_sink(inbox: trio.MemoryReceiveChannel[M], prepare: Callable[[list[M]], P],
                   write: Callable[[P], Awaitable[Mapping[int, str] | None]], *, what: str,
                   dependency: str,
                   batch_max: int, log: logging.Logger, backoff: Backoff | None = None,
                   health: DependencyHealth | None = None,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """`prepare` turns each batch into what `write` sends, once: a retry resends the same.
    `write` may return, by position in the batch, why a message was written only in a
    minimal form (the server refused it); its receipt carries that. `what` names a
    write of `{n}` messages in log lines."""
    with inbox:
        task_status.started()
        async for first in inbox:
            batch = ready(inbox, first, batch_max)
            prepared = prepare(batch)
            refused = await retry_transient(partial(write, prepared),
                                            what=what.format(n=len(batch)), log=log,
                                            backoff=backoff, health=health,
                                            dependency=dependency) or {}
            for index, message in enumerate(batch):
                if message.receipt is not None:
                    message.receipt.set(refused.get(index))
