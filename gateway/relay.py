"""relay: reader tasks serve every open event stream of the gateway.

Each reader owns one Redis connection and blocks in one XREAD over all the streams
its clients follow (one reader per STREAMS_PER_READER open streams; a new stream goes
to the least busy). A stream is read from the oldest position any of its clients
needs; each client gets only entries after its own. A client's buffer is bounded:
a client that does not read is not given more (it is marked behind and later
catches up from Redis by itself), so a slow or stuck client never grows the
gateway's memory. A read that fails because of one stream (its key holds another type,
Redis refuses its position) ends that stream's clients with the reason; the reader's
other streams keep their positions. A failure of the connection or the server is
retried with backoff for all.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from actors.backoff import Backoff
from actors.errors import PermanentError, StreamsRefused, TransientError
from messages.ports import Entry

log = logging.getLogger("chat_actors.gateway.relay")

CLIENT_BUFFER = 64  # entries a client may have unread before it must catch up itself
READ_COUNT = 256  # entries per stream per XREAD
BLOCK_MS = 5000
STREAMS_PER_READER = 16  # open streams per reader before another reader starts
UNBLOCK_AGAIN_S = 0.002  # an UNBLOCK that found no XREAD blocked yet is sent again after this


def entry_key(entry_id: str) -> tuple[int, int]:
    """A Redis entry id ("<ms>-<n>") as a comparable pair."""
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


class Reader(Protocol):
    async def read(self, streams: Mapping[str, str], count: int,
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
    failure: str | None = None  # why its stream cannot be read: the client is told and ended

    def fail(self, reason: str) -> None:
        """End this client (its receive ends once it has what came before) with why."""
        self.failure = reason
        self.send.close()

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
    # Where each stream is read from next: the oldest entry id a current client has
    # (kept as clients come, go and are served, so a read never walks every client).
    positions: dict[str, str] = field(default_factory=dict[str, str])
    changed: trio.Event = field(default_factory=trio.Event)
    unblock: trio.Event = field(default_factory=trio.Event)  # its XREAD must start over
    version: int = 0  # counts position changes that need a new XREAD
    reading: int | None = None  # the version the XREAD in flight was started at


class Relay:
    """`subscribe` a client to a stream; `run` the readers (one per connection).

    A reader is added for every STREAMS_PER_READER open streams, up to `readers`: a
    blocking XREAD costs Redis a few microseconds for each stream it names, paid
    again on every read, so a reader naming a thousand streams costs about a
    millisecond per relayed event where sixteen cost next to nothing. A stream stays
    with its reader while any client follows it; a new one goes to the least busy.
    """

    def __init__(self, make_reader: Callable[[], Reader], readers: int) -> None:
        self._make_reader = make_reader
        self._most = readers
        self._states: list[_ReaderState] = []
        self._assigned: dict[str, _ReaderState] = {}
        self._nursery: trio.Nursery | None = None
        self._emptied = trio.Event()
        self.closed = False  # closing: no new subscription gets entries

    def _state(self, key: str) -> _ReaderState:
        state = self._assigned.get(key)
        if state is None:
            state = min(self._states, key=lambda s: len(s.subscriptions), default=None)
            if state is None or (len(state.subscriptions) >= STREAMS_PER_READER
                                 and len(self._states) < self._most):
                state = _ReaderState(self._make_reader())
                self._states.append(state)
                if self._nursery is not None:
                    self._start(self._nursery, state)
            self._assigned[key] = state
        return state

    def readers(self) -> int:
        return len(self._states)

    def subscribe(self, key: str, after: str) -> Subscription:
        send, receive = trio.open_memory_channel[Entry](CLIENT_BUFFER)
        subscription = Subscription(key=key, last=after, send=send, receive=receive)
        if self.closed:
            send.close()  # its client is told to go elsewhere at once
        state = self._state(key)
        state.subscriptions.setdefault(key, set()).add(subscription)
        self._read_from(state, key, after)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        state = self._assigned.get(subscription.key)
        following = state.subscriptions.get(subscription.key) if state is not None else None
        if state is not None and following is not None:
            following.discard(subscription)
            if not following:
                del state.subscriptions[subscription.key]
                state.positions.pop(subscription.key, None)
                self._assigned.pop(subscription.key, None)
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

    def _read_from(self, state: _ReaderState, key: str, after: str) -> None:
        """A client needs `key` after `after`: read it from there unless already earlier.
        A new or earlier position restarts the reader's blocked XREAD (once, however
        many clients arrive meanwhile)."""
        held = state.positions.get(key)
        if held is not None and entry_key(held) <= entry_key(after):
            return
        state.positions[key] = after
        state.version += 1
        state.changed.set()
        state.unblock.set()

    async def catch_up(self, subscription: Subscription,
                       after: Callable[[str, str, int], Awaitable[list[Entry]]]) -> list[Entry]:
        """What a client that fell behind missed, read from Redis by itself, in order.
        Once it has caught up the reader serves it again (and is woken to)."""
        entries = await after(subscription.key, subscription.last, READ_COUNT)
        if entries:
            subscription.last = entries[-1][0]
        if len(entries) < READ_COUNT:
            subscription.behind = False
            if subscription.failure is None:  # a refused stream is not named to a reader again
                self._read_from(self._state(subscription.key), subscription.key,
                                subscription.last)
        return entries

    def open_streams(self) -> int:
        return sum(len(s) for state in self._states for s in state.subscriptions.values())

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)  # open for readers started later
                for state in self._states:
                    self._start(nursery, state)
                self._nursery = nursery
                task_status.started()
        finally:
            self._nursery = None
            for state in self._states:
                state.reader.close()

    def _start(self, nursery: trio.Nursery, state: _ReaderState) -> None:
        nursery.start_soon(self._read, state)
        nursery.start_soon(self._unblock, state)

    async def _unblock(self, state: _ReaderState) -> None:
        """CLIENT UNBLOCK from a thread (a network call never runs on the event loop),
        once for every burst of new positions. An XREAD not yet at the server when the
        UNBLOCK arrives is not woken by it: it is sent again until the read in flight
        is one started after the change."""
        while True:
            await state.unblock.wait()
            state.unblock = trio.Event()
            while state.reading is not None and state.reading < state.version:
                await trio.to_thread.run_sync(state.reader.unblock, abandon_on_cancel=True)
                await trio.sleep(UNBLOCK_AGAIN_S)

    async def _read(self, state: _ReaderState) -> None:
        backoff = Backoff()
        failures = 0
        while True:
            if not state.positions:
                await state.changed.wait()
            state.changed = trio.Event()
            wanted = dict(state.positions)
            if not wanted:
                continue
            state.reading = state.version
            try:
                found = await state.reader.read(wanted, READ_COUNT, BLOCK_MS)
            except StreamsRefused as exc:
                # The fault of some streams alone (a key of another type, a position
                # Redis refuses): their clients are ended, and every other stream keeps
                # its position and is read again at once, never held back by them.
                state.reading = None
                failures = 0
                for key, entries in exc.found:
                    if key in wanted:
                        self._deliver(state, key, wanted[key], entries)
                self._refuse(state, exc.refused)
                continue
            except (TransientError, PermanentError) as exc:
                state.reading = None
                failures += 1
                log.warning("reading streams failed (%s); again in a moment", exc)
                await trio.sleep(backoff.delay(failures))
                continue
            state.reading = None
            failures = 0
            for key, entries in found:
                self._deliver(state, key, wanted[key], entries)

    def _refuse(self, state: _ReaderState, refused: Mapping[str, str]) -> None:
        """Streams the reader cannot read: each of their clients is ended with the reason,
        and the reader stops naming them. A client that comes back is read afresh."""
        for key, reason in refused.items():
            following = state.subscriptions.pop(key, set[Subscription]())
            state.positions.pop(key, None)
            if self._assigned.get(key) is state:
                del self._assigned[key]
            log.warning("stream %s cannot be read (%s): its %d client(s) are ended",
                        key, reason, len(following))
            for subscription in following:
                subscription.fail(reason)
        if not self.open_streams():
            self._emptied.set()

    def _deliver(self, state: _ReaderState, key: str, read_from: str,
                 entries: Sequence[Entry]) -> None:
        """Entries read after `read_from` go to each client that had everything up to
        there; one that came meanwhile needing older entries is served by the next read,
        from its own position."""
        following = state.subscriptions.get(key)
        if not following or not entries:
            return
        start = entry_key(read_from)
        oldest: str | None = None
        for subscription in list(following):
            if not subscription.behind and entry_key(subscription.last) >= start:
                for entry in entries:
                    subscription.offer(entry)
            if not subscription.behind and (oldest is None or
                                            entry_key(subscription.last) < entry_key(oldest)):
                oldest = subscription.last
        if oldest is not None:
            state.positions[key] = oldest
        else:
            state.positions.pop(key, None)  # every client catches up by itself first
