"""Capped exponential backoff with full jitter, for transient failures."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import trio

from actors.errors import TransientError

T = TypeVar("T")

# One generator for every Backoff: seeding a new one reads os.urandom (~60 us),
# and retry_transient makes a Backoff on every call, failing or not.
_JITTER = random.Random()


class Backoff:
    def __init__(self, *, base_s: float = 0.1, cap_s: float = 10.0,
                 rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self._rng = rng or _JITTER

    def delay(self, attempt: int, hint_s: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (1-based); honours a server's hint."""
        ceiling = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
        jittered = self._rng.uniform(0, ceiling)
        return max(jittered, min(hint_s, self.cap_s * 6)) if hint_s else jittered


class DependencyHealth(Protocol):
    def failed(self, dependency: str, problem: object) -> None: ...
    def recovered(self, dependency: str) -> None: ...


async def retry_transient(op: Callable[[], Awaitable[T]], *, what: str, log: logging.Logger,
                          backoff: Backoff | None = None, attempts: int | None = None,
                          health: DependencyHealth | None = None,
                          dependency: str = "") -> T:
    """Run `op` until it does not raise TransientError (forever if attempts is None).

    With `health`, each failure marks `dependency` down and a success marks it up.
    """
    backoff = backoff or Backoff()
    failures = 0
    while True:
        try:
            result = await op()
        except TransientError as exc:
            if health is not None:
                health.failed(dependency, exc)
            failures += 1
            if attempts is not None and failures >= attempts:
                raise
            wait = backoff.delay(failures, exc.retry_after)
            log.warning("%s failed (%s); retry %d in %.2fs", what, exc, failures, wait)
            await trio.sleep(wait)
        else:
            if health is not None and failures:
                health.recovered(dependency)
            return result
