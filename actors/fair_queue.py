"""Turns at a few shared workers, handed round-robin over owners (the gateway's uploads).

One FIFO per owner, at most one turn per owner at a time, and an owner whose turn
ends goes to the back of the line when it has more waiting. So an owner with 50
waiting delays another owner's first by at most one turn of each owner ahead of
it, never by its 50; and one owner's turns never overlap (its writes stay in order).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager

import trio


class NoTurn(Exception):
    """No turn came within the wait; the caller did none of its work."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"no turn within {wait_s:g} s")
        self.wait_s = wait_s


class FairQueue:
    def __init__(self, workers: int) -> None:
        self._free = workers
        self._waiting: dict[str, deque[trio.Event]] = {}  # each owner's turns, in order
        self._line: deque[str] = deque()  # owners with a turn waiting and none running
        self._running: set[str] = set()

    def waiting(self) -> int:
        """Turns waiting now, all owners together."""
        return sum(len(turns) for turns in self._waiting.values())

    def running(self) -> int:
        return len(self._running)

    @asynccontextmanager
    async def turn(self, owner: str, wait_s: float) -> AsyncGenerator[None]:
        """Hold one of the workers for the block, once `owner`'s turn comes; NoTurn
        when it has not come within `wait_s` (the turn is withdrawn)."""
        granted = trio.Event()
        turns = self._waiting.setdefault(owner, deque())
        turns.append(granted)
        if len(turns) == 1 and owner not in self._running:
            self._line.append(owner)
        self._hand_out()
        try:
            with trio.move_on_after(wait_s):
                await granted.wait()
        except BaseException:  # cancelled while waiting: give back what it holds
            self._leave(owner, granted)
            raise
        if not granted.is_set():
            self._leave(owner, granted)
            raise NoTurn(wait_s)
        try:
            yield
        finally:
            self._done(owner)

    def _hand_out(self) -> None:
        while self._free and self._line:
            owner = self._line.popleft()
            turns = self._waiting[owner]
            granted = turns.popleft()
            if not turns:
                del self._waiting[owner]
            self._running.add(owner)
            self._free -= 1
            granted.set()

    def _done(self, owner: str) -> None:
        self._running.discard(owner)
        self._free += 1
        if owner in self._waiting:
            self._line.append(owner)  # behind every owner that waited meanwhile
        self._hand_out()

    def _leave(self, owner: str, granted: trio.Event) -> None:
        """A turn that stops waiting: given back when it was granted meanwhile, else
        taken out of its owner's FIFO."""
        if granted.is_set():
            self._done(owner)
            return
        turns = self._waiting[owner]
        turns.remove(granted)
        if not turns:
            del self._waiting[owner]
            if owner in self._line:
                self._line.remove(owner)
