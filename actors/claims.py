"""claims: the actor that claims every job asking at the same time in one round trip.

A poll brings hundreds of requests at once, and each job's first act is its claim
(contract 6.1): one by one, that was a worker-thread hop and two statements per job
(the claim, its history). The claims actor takes every order waiting in its
mailbox, up to `batch_max`, and makes them one `claim_many`: one hop, three
statements (the claims, the rows of the jobs not claimed, the histories) for the
batch. An order for a job id already in the batch (a duplicate delivery) goes in the
next one. A failed batch fails each of its orders: each job's own retry decides.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import trio

from actors.ports import JobStore
from messages.ports import ClaimOrder, ClaimResult

CLAIM_MAILBOX = 1024


@dataclass(eq=False)
class PendingClaim:
    order: ClaimOrder
    done: trio.Event = field(default_factory=trio.Event)
    result: ClaimResult | None = None
    error: Exception | None = None


class Claims:
    """The jobs' side of the claims actor."""

    def __init__(self, mailbox: trio.MemorySendChannel[PendingClaim]) -> None:
        self._mailbox = mailbox

    async def claim(self, order: ClaimOrder) -> ClaimResult:
        pending = PendingClaim(order)
        await self._mailbox.send(pending)
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result


async def run_claims(inbox: trio.MemoryReceiveChannel[PendingClaim], store: JobStore, *,
                     lease_holder: str, lease_s: float, history_limit: int,
                     batch_max: int = 500,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Claim in batches until the mailbox closes or the actor is cancelled."""
    task_status.started()
    later: deque[PendingClaim] = deque()  # duplicates of a job id in the batch before
    while True:
        if not later:
            try:
                later.append(await inbox.receive())
            except trio.EndOfChannel:
                return
        batch: list[PendingClaim] = []
        ids: set[str] = set()
        again: deque[PendingClaim] = deque()
        while len(batch) < batch_max:
            if later:
                pending = later.popleft()
            else:
                try:
                    pending = inbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if pending.order.job_id in ids:
                again.append(pending)
            else:
                ids.add(pending.order.job_id)
                batch.append(pending)
        later.extendleft(reversed(again))
        try:
            results = await store.claim_many([p.order for p in batch], lease_holder=lease_holder,
                                              lease_s=lease_s, history_limit=history_limit)
        except Exception as exc:
            for pending in batch:
                pending.error = exc
                pending.done.set()
            continue
        for pending, result in zip(batch, results, strict=True):
            pending.result = result
            pending.done.set()
