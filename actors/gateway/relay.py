"""relay: a few reader tasks serve every open event stream of the gateway.

Each reader owns one Redis connection and blocks in one XREAD over all the streams
its clients follow (a stream goes to a reader by its key's hash). A stream is read
from the oldest position any of its clients needs; each client gets only entries
after its own. A client's buffer is bounded: a client that does not read is not
given more (it is marked behind and later catches up from Redis by itself), so
a slow or stuck client never grows the gateway's memory.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from actors.backoff import Backoff
from actors.errors import PermanentError, TransientError

log = logging.getLogger("chat_actors.gateway.relay")

Entry = tuple[str, dict[str, str]]
CLIENT_BUFFER = 64  # entries a client may have unread before it must catch up itself
READ_COUNT = 256  # entries per stream per XREAD
BLOCK_MS = 5000


def entry_key(entry_id: str) -> tuple[int, int]:
    """A Redis entry id ("<ms>-<n>") as a comparable pair."""
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


class Reader(Protocol):
    def read(self, streams: Mapping[str, str], count: int,
             block_ms: int) -> Sequence[tuple[str, Sequence[Entry]]]: ...
    def unblock(self) -> None: ...
    def close(self) -> None: ...


@dataclass(eq=False)
class Subscription:
    """One client's view of one stream: entries after `last` come through `receive`."""

    key: str
    last: str
    send: trio.MemorySendChannel[Entry]
    receive: trio.MemoryReceiveChannel[Entry]
    behind: bool = False  # entries were dropped: catch up from Redis before going on

    def offer(self, entry: Entry) -> None:
        if self.behind or entry_key(entry[0]) <= entry_key(self.last):
            return
        try:
            self.send.send_nowait(entry)
        except trio.WouldBlock:
            self.behind = True  # the client reads from Redis itself once it drains
        except trio.ClosedResourceError:
            pass  # the relay is closing: its client is being sent elsewhere
        else:
            self.last = entry[0]


@dataclass
class _ReaderState:
    reader: Reader
    subscriptions: dict[str, set[Subscription]] = field(default_factory=dict[str, set[Subscription]])
    changed: trio.Event = field(default_factory=trio.Event)


class Relay:
    """`subscribe` a client to a stream; `run` the readers (one per connection)."""

    def __init__(self, make_reader: Callable[[], Reader], readers: int) -> None:
        self._states = [_ReaderState(make_reader()) for _ in range(readers)]
        self._emptied = trio.Event()
        self.closed = False  # closing: no new subscription gets entries
        self.reads = 0  # XREAD calls, for /metrics

    def _state(self, key: str) -> _ReaderState:
        return self._states[zlib.crc32(key.encode()) % len(self._states)]

    def subscribe(self, key: str, after: str) -> Subscription:
        send, receive = trio.open_memory_channel[Entry](CLIENT_BUFFER)
        subscription = Subscription(key=key, last=after, send=send, receive=receive)
        if self.closed:
            send.close()  # its client is told to go elsewhere at once
        state = self._state(key)
        state.subscriptions.setdefault(key, set()).add(subscription)
        self._wake(state)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        state = self._state(subscription.key)
        following = state.subscriptions.get(subscription.key)
        if following is not None:
            following.discard(subscription)
            if not following:
                del state.subscriptions[subscription.key]
        subscription.send.close()
        if not self.open_streams():
            self._emptied.set()

    def close(self) -> None:
        """End every subscription: each client's next read ends, and it is sent on."""
        self.closed = True
        for state in self._states:
            for following in state.subscriptions.values():
                for subscription in following:
                    subscription.send.close()

    async def drained(self) -> None:
        """Return once no client follows a stream."""
        while self.open_streams():
            self._emptied = trio.Event()
            await self._emptied.wait()

    def _wake(self, state: _ReaderState) -> None:
        state.changed.set()
        state.reader.unblock()

    async def catch_up(self, subscription: Subscription,
                       after: Callable[[str, str, int], Awaitable[list[Entry]]]) -> list[Entry]:
        """What a client that fell behind missed, read from Redis by itself, in order.
        Once it has caught up the reader serves it again (and is woken to)."""
        entries = await after(subscription.key, subscription.last, READ_COUNT)
        if entries:
            subscription.last = entries[-1][0]
        if len(entries) < READ_COUNT:
            subscription.behind = False
            self._wake(self._state(subscription.key))
        return entries

    def open_streams(self) -> int:
        return sum(len(s) for state in self._states for s in state.subscriptions.values())

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for state in self._states:
                    nursery.start_soon(self._read, state)
                task_status.started()
        finally:
            for state in self._states:
                state.reader.close()

    async def _read(self, state: _ReaderState) -> None:
        backoff = Backoff()
        failures = 0
        while True:
            if not state.subscriptions:
                await state.changed.wait()
            state.changed = trio.Event()
            # Each stream from the oldest position one of its clients still needs.
            streams = {key: min((s.last for s in subs if not s.behind), key=entry_key,
                                default=None) for key, subs in state.subscriptions.items()}
            wanted = {key: last for key, last in streams.items() if last is not None}
            if not wanted:
                await state.changed.wait()
                continue
            try:
                found = await trio.to_thread.run_sync(
                    state.reader.read, wanted, READ_COUNT, BLOCK_MS, abandon_on_cancel=True)
            except (TransientError, PermanentError) as exc:
                failures += 1
                log.warning("reading streams failed (%s); again in a moment", exc)
                await trio.sleep(backoff.delay(failures))
                continue
            failures = 0
            self.reads += 1
            for key, entries in found:
                for subscription in list(state.subscriptions.get(key, ())):
                    for entry in entries:
                        subscription.offer(entry)
