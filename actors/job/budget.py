"""budget: reserve a job's worst case against its user's limits before any model call.

The holds are taken all or none in one Postgres transaction (JobStore.reserve)
and settled to what the job really used in the same transaction as its
terminal row; a terminal row also gives back what an earlier attempt still held.
Over a limit the job is refused with `budget_exceeded` (USD) or `rate_limited`
(requests or tokens per minute). Windows are UTC; old ones are pruned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import NamedTuple

from actors.aliases import Alias
from actors.backoff import retry_transient
from actors.errors import LimitReached
from actors.job.spend import worst_try_usd
from actors.ports import Pricing
from actors.worker import Worker
from config import Budgets
from messages.mailboxes import JobRef
from messages.ports import Hold, Refused

log = logging.getLogger("chat_actors.budget")

# A PermanentError with one of these codes refuses the job before any model call.
REFUSALS = ("budget_exceeded", "rate_limited")
_LIMIT_NAMES = {"usd": "USD budget per {period}", "requests": "requests per minute",
                "tokens": "tokens per minute"}


class Reservation(NamedTuple):
    """What a job reserved: the USD it may spend (None: no USD limit), and whether any
    hold waits to be settled by its terminal row."""

    cap_usd: float | None = None
    held: bool = False


def holds_for(budgets: Budgets, user_id: str, *, worst_usd: float,
              tokens: int) -> list[Hold]:
    """What a job of `user_id` must reserve under each limit that applies to it."""
    holds: list[Hold] = []
    for scope, limit in budgets.for_user(user_id):
        if limit.usd:
            holds.append(Hold(scope=scope, kind="usd", amount=worst_usd, limit=limit.usd))
        if limit.rpm:
            holds.append(Hold(scope=scope, kind="requests", amount=1, limit=limit.rpm))
        if limit.tpm:
            holds.append(Hold(scope=scope, kind="tokens", amount=tokens, limit=limit.tpm))
    return holds


def worst_job_usd(pricing: Pricing, chain: Sequence[Alias], prompt_tokens: int) -> float:
    """The most one try can cost on the alias or any of its fallbacks."""
    answer_tokens = chain[0].spec.max_tokens
    return max(worst_try_usd(pricing, alias.spec, prompt_tokens, answer_tokens)
               for alias in chain)


async def reserve(worker: Worker, job: JobRef, chain: Sequence[Alias],
                  prompt_tokens: int) -> Reservation:
    """Reserve the job's worst case; raises LimitReached over a limit."""
    config = worker.config
    budgets = config.budgets
    worst_usd = worst_job_usd(worker.pricing, chain, prompt_tokens)
    holds = holds_for(budgets, job.user_id, worst_usd=worst_usd,
                      tokens=prompt_tokens + chain[0].spec.max_tokens)
    if not holds:
        return Reservation()

    async def take() -> Refused | None:
        return await worker.store.reserve(job_id=job.job_id, lease_holder=worker.worker_id,
                                          holds=holds, period=budgets.period)

    refused = await retry_transient(take, what="budget reservation", log=log,
                                    health=worker.health, dependency="postgres")
    if refused is None:
        return Reservation(worst_usd if any(h.kind == "usd" for h in holds) else None, True)
    what = _LIMIT_NAMES[refused.kind].format(period=budgets.period)
    log.warning("job %s refused: %s over its %s", job.job_id, refused.scope, what)
    usd = refused.kind == "usd"
    raise LimitReached(
        f"{refused.scope} is over its {what}: this job needs {refused.amount:g}, "
        f"{refused.taken:g} of {refused.limit:g} is used or reserved",
        code="budget_exceeded" if usd else "rate_limited",
        # rates count per UTC minute: the next one starts within 60 s
        retry_after_s=None if usd else float(60 - int(time.time()) % 60))
