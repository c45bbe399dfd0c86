"""Which offsets may be committed: per partition, the highest contiguous settled one.

A job is settled when it is terminal in Postgres and its `done` is in Redis
(or it was skipped as a duplicate). Jobs finish out of order; the committed
offset only moves past a job once every job before it on its partition is
settled, so a crash redelivers everything that might not be persisted.
Pure bookkeeping: no I/O, owned by the intake.

Its memory is bounded: while one job holds a partition's head (its terminal
write retried through an outage), later deliveries settle behind it and wait.
At `limit` tracked offsets the intake fetches nothing more until the head moves.
"""

from __future__ import annotations

from collections import deque

from messages.mailboxes import Partition

MAX_TRACKED = 10_000  # ~1 MB: deliveries waiting for an earlier one to settle


class OffsetTracker:
    def __init__(self, limit: int = MAX_TRACKED) -> None:
        self.limit = limit
        self._pending: dict[Partition, deque[int]] = {}
        self._settled: dict[Partition, set[int]] = {}
        self._committable: dict[Partition, int] = {}

    def track(self, partition: Partition, offset: int) -> None:
        """Note a delivered offset; deliveries of one partition arrive in order."""
        pending = self._pending.setdefault(partition, deque())
        if pending and offset <= pending[-1]:
            # A rewind (seek, rebalance back) redelivers: forget what is above it.
            while pending and pending[-1] >= offset:
                self._settled.get(partition, set()).discard(pending.pop())
        pending.append(offset)

    def settle(self, partition: Partition, offset: int) -> None:
        pending = self._pending.get(partition)
        if not pending or offset not in pending:
            return  # revoked meanwhile: the partition's next holder redelivers it
        settled = self._settled.setdefault(partition, set())
        settled.add(offset)
        while pending and pending[0] in settled:
            done = pending.popleft()
            settled.discard(done)
            self._committable[partition] = done + 1

    def take_commits(self) -> dict[Partition, int]:
        """The offsets to commit now (next offset to read), and forget them."""
        commits, self._committable = self._committable, {}
        return commits

    def retry_commits(self, commits: dict[Partition, int]) -> None:
        """A commit failed: offer its offsets again with the next ones (those of
        partitions revoked meanwhile are their next holder's)."""
        for partition, offset in commits.items():
            if partition in self._pending and offset > self._committable.get(partition, -1):
                self._committable[partition] = offset

    def revoke(self, partitions: list[Partition]) -> dict[Partition, int]:
        """Stop tracking `partitions`; return their offsets still to commit."""
        commits: dict[Partition, int] = {}
        for partition in partitions:
            self._pending.pop(partition, None)
            self._settled.pop(partition, None)
            if partition in self._committable:
                commits[partition] = self._committable.pop(partition)
        return commits

    def unsettled(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def room(self) -> int:
        """How many more deliveries may be tracked before the intake must wait."""
        return max(0, self.limit - self.unsettled())
