"""Helpers for Trio memory channels shared by the actors."""

from __future__ import annotations

from typing import TypeVar

import trio

T = TypeVar("T")


def ready(inbox: trio.MemoryReceiveChannel[T], first: T, limit: int) -> list[T]:
    """`first` and whatever already waits in `inbox`, up to `limit`, without a checkpoint."""
    batch = [first]
    while len(batch) < limit:
        try:
            batch.append(inbox.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return batch
