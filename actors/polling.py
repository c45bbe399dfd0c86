"""The poll step the intake and the control actor share: one batch from a Kafka topic,
or, when the broker is away, an empty batch after a jittered backoff.

It returns after every try, failed or not, so the caller's loop still sees its
stop signal and its pause state during an outage. Failures mark Kafka down for
/readyz; the first success after them marks it up again.
"""

from __future__ import annotations

import logging

import trio

from actors.backoff import Backoff, DependencyHealth
from actors.errors import TransientError
from actors.ports import Source
from messages.mailboxes import Delivery

POLL_TIMEOUT_S = 0.1


class Poller:
    def __init__(self, source: Source, *, what: str, log: logging.Logger,
                 health: DependencyHealth | None = None, backoff: Backoff | None = None) -> None:
        self._source = source
        self._what = what
        self._log = log
        self._health = health
        self._backoff = backoff or Backoff(cap_s=5.0)
        self._failures = 0

    async def poll(self, max_records: int) -> list[Delivery]:
        try:
            batch = await self._source.poll(max_records, POLL_TIMEOUT_S)
        except TransientError as exc:
            self._failures += 1
            if self._health is not None:
                self._health.failed("kafka", exc)
            wait = self._backoff.delay(self._failures)
            self._log.warning("%s poll failed (%s); retry in %.2fs", self._what, exc, wait)
            await trio.sleep(wait)
            return []
        if self._failures and self._health is not None:
            self._health.recovered("kafka")
        self._failures = 0
        return batch
