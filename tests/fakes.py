"""One small fake per port of our own (actors/ports.py), for unit tests of actor logic.

Only our ports are faked here; Kafka, Redis, Postgres and the vendor are real in
the integration tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio

from actors.errors import TransientError
from messages.ports import Capabilities, Claimed, ClaimResult, Hold, Rates, Refused, TokenCounts


@dataclass
class FakeStore:
    """The JobStore port: every claim is a fresh attempt 1, every lease renews unless
    taken over (`taken`) or Postgres is `down`."""

    released: list[str] = field(default_factory=list[str])
    renewals: list[tuple[list[str], float]] = field(default_factory=list[tuple[list[str], float]])
    taken: set[str] = field(default_factory=set[str])
    down: bool = False

    async def claim(self, **_: object) -> ClaimResult:
        return Claimed(1)

    async def renew_leases(self, *, job_ids: Sequence[str], lease_holder: str,
                           lease_s: float) -> set[str]:
        self.renewals.append((list(job_ids), trio.current_time()))
        if self.down:
            raise TransientError("postgres is down")
        return set(job_ids) - self.taken

    async def release_lease(self, *, job_id: str, lease_holder: str) -> None:
        self.released.append(job_id)

    async def reserve(self, *, job_id: str, lease_holder: str, holds: Sequence[Hold],
                      period: str) -> Refused | None:
        return None

    async def prune_ledger(self, *, period: str) -> int:
        return 0

    async def images(self, *, user_id: str, hashes: Iterable[str]) -> dict[str, tuple[str, bytes]]:
        return {}


class NoEvents:
    """The read side of the EventWriter port for a job that never ran before."""

    async def done_recorded(self, job_id: str) -> bool:
        return False

    async def last_seq(self, job_id: str, attempt: int) -> int:
        return -1

    async def hand_over(self, job_id: str, attempt: int) -> None:
        pass


@dataclass
class FlatPricing:
    """The Pricing port at fixed per-token prices (0 by default: free)."""

    input_price: float = 0.0
    output_price: float = 0.0

    def cost_usd(self, model: str, used: TokenCounts, own: Rates) -> float | None:
        input_price = self.input_price if own.input is None else own.input
        output_price = self.output_price if own.output is None else own.output
        return used.prompt * input_price + used.completion * output_price

    def provider_of(self, model: str) -> str:
        return model.split("/", 1)[0] if "/" in model else "unknown"

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities()


class WordCounting:
    """The TokenCounting port: one token per word."""

    def counter(self, model: str) -> Callable[[str], int]:
        return lambda text: len(text.split())
