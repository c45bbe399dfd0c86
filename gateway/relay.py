"""relay: reader tasks serve every open event stream of the gateway.

Two ways to learn that a stream grew, one relay each, the rest shared:
- `NotifiedRelay` (a Redis that sends keyspace notifications for streams, and every
  Redis Cluster): a watch (one Pub/Sub connection per primary) says which followed
  streams were appended to, and one reader reads just those, in one non-blocking
  XREAD, however many streams are open. A read costs in proportion to the entries it
  finds, never to the streams open; under load each read carries many events.
- `Relay` (a Redis that refuses CONFIG SET and sends no notifications): each reader
  owns one Redis connection and blocks in one XREAD over all the streams its clients
  follow (one reader per STREAMS_PER_READER open streams; a new stream goes to the
  least busy).

A stream is read from the oldest position any of its clients needs; each client gets
only entries after its own. A client's buffer is bounded: a client that does not read
is not given more (it is marked behind and later catches up from Redis by itself), so
a slow or stuck client never grows the gateway's memory. A read that fails because of
one stream (its key holds another type, Redis refuses its position) ends that
stream's clients with the reason; the reader's other streams keep their positions. A
failure of the connection or the server is retried with backoff for all.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import trio

from actors.backoff import Backoff
from actors.errors import PermanentError, StreamsRefused, TransientError
from messages.ports import Entry

log = logging.getLogger("chat_actors.gateway.relay")

READ_COUNT = 256  # entries per stream per XREAD
BLOCK_MS = 5000
STREAMS_PER_READER = 16  # open streams per blocking reader before another one starts
UNBLOCK_AGAIN_S = 0.002  # an UNBLOCK that found no XREAD blocked yet is sent again after this


def entry_key(entry_id: str) -> tuple[int, int]:
    """A Redis entry id ("<ms>-<n>") as a comparable pair."""
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


Found = Sequence[tuple[str, Sequence[Entry]]]


class Reader(Protocol):
    """Blocks in one XREAD over `streams` until any has entries after its position."""

    async def read(self, streams: Mapping[str, str], count: int, block_ms: int) -> Found: ...
    def unblock(self) -> None: ...
    def close(self) -> None: ...


class NowReader(Protocol):
    """Reads `streams` after their positions at once (no BLOCK): what is there now."""

    async def read_now(self, streams: Mapping[str, str], count: int) -> Found: ...
    def close(self) -> None: ...


R = TypeVar("R", Reader, NowReader)


@dataclass(eq=False)
class Subscription:
    """One client's view of one stream: entries after `last` go to `take`, called by
    the reader with all a read found for this client at once. `take` writes them to
    the client's socket there and then (True), or refuses them (False: its socket has
    not taken what came before): the client is then behind, given nothing more, and
    catches up from Redis by itself, so a slow client never grows the gateway's
    memory. `wake` is set for the client's own task whenever it has something to do."""

    key: str
    last: str
    take: Callable[[Sequence[Entry]], bool]
    wake: trio.Event = field(default_factory=trio.Event)
    behind: bool = False  # entries were refused: catch up from Redis before going on
    failure: str | None = None  # why its stream cannot be read: the client is told and ended
    ended: bool = False  # the relay is closing (or failed it): nothing more comes

    def fail(self, reason: str) -> None:
        """End this client with why its stream cannot be read."""
        self.failure = reason
        self.end()

    def end(self) -> None:
        self.ended = True
        self.wake.set()

    def offer(self, entries: Sequence[Entry], first: tuple[int, int]) -> None:
        """`entries` (in order; `first` is the first one's entry_key) for this client."""
        if self.behind or self.ended:
            return
        last = entry_key(self.last)
        # A read's entries come in order: when the first is new, all are.
        fresh = entries if first > last else [
            entry for entry in entries if entry_key(entry[0]) > last]
        if fresh:
            self.give(fresh)

    def give(self, fresh: Sequence[Entry]) -> bool:
        """Entries all new to this client, to `take`: whether it took them."""
        if self.take(fresh):
            self.last = fresh[-1][0]
            return True
        self.behind = True  # the client reads from Redis itself once it can write
        self.wake.set()
        return False


@dataclass
class _ReaderState(Generic[R]):
    reader: R
    subscriptions: dict[str, set[Subscription]] = field(default_factory=dict[str, set[Subscription]])
    # Where each stream is read from next: the oldest entry id a current client has
    # (kept as clients come, go and are served, so a read never walks every client).
    positions: dict[str, str] = field(default_factory=dict[str, str])
    changed: trio.Event = field(default_factory=trio.Event)
    # Notified: the streams to read next (appended to, new, or not read to their end).
    due: set[str] = field(default_factory=set[str])
    # Blocking: its XREAD must start over (a new or earlier position).
    unblock: trio.Event = field(default_factory=trio.Event)
    version: int = 0  # counts position changes that need a new XREAD
    reading: int | None = None  # the version the XREAD in flight was started at


class _Relay(Generic[R]):
    """`subscribe` a client to a stream; `run` the readers. What both relays share:
    the subscriptions, each stream's position, delivery, refusal and catching up."""

    per_reader = STREAMS_PER_READER

    def __init__(self, make_reader: Callable[[], R], readers: int) -> None:
        self._make_reader = make_reader
        self._most = readers
        self._states: list[_ReaderState[R]] = []
        self._assigned: dict[str, _ReaderState[R]] = {}
        self._nursery: trio.Nursery | None = None
        self._emptied = trio.Event()
        self.closed = False  # closing: no new subscription gets entries

    def _state(self, key: str) -> _ReaderState[R]:
        state = self._assigned.get(key)
        if state is None:
            state = min(self._states, key=lambda s: len(s.subscriptions), default=None)
            if state is None or (len(state.subscriptions) >= self.per_reader
                                 and len(self._states) < self._most):
                state = _ReaderState[R](self._make_reader())
                self._states.append(state)
                if self._nursery is not None:
                    self._start(self._nursery, state)
            self._assigned[key] = state
        return state

    def readers(self) -> int:
        return len(self._states)

    def subscribe(self, key: str, after: str,
                  take: Callable[[Sequence[Entry]], bool]) -> Subscription:
        subscription = Subscription(key=key, last=after, take=take)
        if self.closed:
            subscription.end()  # its client is told to go elsewhere at once
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
                state.due.discard(subscription.key)
                self._assigned.pop(subscription.key, None)
        subscription.ended = True
        if not self.open_streams():
            self._emptied.set()

    def close(self) -> None:
        """End every subscription: each client's next read ends, and it is sent on."""
        self.closed = True
        for state in self._states:
            for following in state.subscriptions.values():
                for subscription in following:
                    subscription.end()

    async def drained(self) -> None:
        """Return once no client follows a stream."""
        while self.open_streams():
            self._emptied = trio.Event()
            await self._emptied.wait()

    def _read_from(self, state: _ReaderState[R], key: str, after: str) -> None:
        """A client needs `key` after `after`: read it from there unless already earlier."""
        held = state.positions.get(key)
        if held is not None and entry_key(held) <= entry_key(after):
            return
        state.positions[key] = after
        self._moved(state, key)

    def _moved(self, state: _ReaderState[R], key: str) -> None:
        """`key`'s position went back (or it is new): it must be read from there."""
        raise NotImplementedError

    async def catch_up(self, subscription: Subscription,
                       after: Callable[[str, str, int], Awaitable[list[Entry]]]
                       ) -> tuple[list[Entry], bool]:
        """What a client that fell behind missed, read from Redis by itself, in order,
        and whether that is all: once the client has written it, `resume` it."""
        entries = await after(subscription.key, subscription.last, READ_COUNT)
        if entries:
            subscription.last = entries[-1][0]
        return entries, len(entries) < READ_COUNT

    def resume(self, subscription: Subscription) -> None:
        """A client that caught up is served by the reader again, from where it is (not
        before it has written what it caught up: the reader's entries come after)."""
        subscription.behind = False
        if subscription.failure is None and not subscription.ended:
            # A refused stream is not named to a reader again.
            self._read_from(self._state(subscription.key), subscription.key, subscription.last)

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

    def _start(self, nursery: trio.Nursery, state: _ReaderState[R]) -> None:
        raise NotImplementedError

    def _refuse(self, state: _ReaderState[R], refused: Mapping[str, str]) -> None:
        """Streams the reader cannot read: each of their clients is ended with the reason,
        and the reader stops naming them. A client that comes back is read afresh."""
        for key, reason in refused.items():
            following = state.subscriptions.pop(key, set[Subscription]())
            state.positions.pop(key, None)
            state.due.discard(key)
            if self._assigned.get(key) is state:
                del self._assigned[key]
            log.warning("stream %s cannot be read (%s): its %d client(s) are ended",
                        key, reason, len(following))
            for subscription in following:
                subscription.fail(reason)
        if not self.open_streams():
            self._emptied.set()

    def _settle(self, state: _ReaderState[R], wanted: Mapping[str, str], found: Found) -> None:
        """What a read found goes to the clients of each stream it was asked for."""
        for key, entries in found:
            if key in wanted:
                self._deliver(state, key, wanted[key], entries)

    def _deliver(self, state: _ReaderState[R], key: str, read_from: str,
                 entries: Sequence[Entry]) -> None:
        """Entries read after `read_from` go to each client that had everything up to
        there; one that came meanwhile needing older entries is served by the next read,
        from its own position."""
        following = state.subscriptions.get(key)
        if not following or not entries:
            return
        if len(following) == 1:
            # The usual stream: one client, at the position the read began from, so
            # every entry is new to it and no id needs parsing.
            (subscription,) = following
            if subscription.last == read_from and not (subscription.behind
                                                       or subscription.ended):
                if subscription.give(entries):
                    state.positions[key] = subscription.last
                else:
                    state.positions.pop(key, None)  # it catches up by itself first
                return
        start = entry_key(read_from)
        first = entry_key(entries[0][0])
        oldest: tuple[tuple[int, int], str] | None = None
        for subscription in list(following):
            if subscription.behind:
                continue
            at = subscription.last
            if at == read_from or entry_key(at) >= start:
                subscription.offer(entries, first)
                at = subscription.last
            if not subscription.behind:
                # The usual client is where the read ended: one comparison, no parse.
                at_key = entry_key(at)
                if oldest is None or at_key < oldest[0]:
                    oldest = (at_key, at)
        if oldest is not None:
            state.positions[key] = oldest[1]
        else:
            state.positions.pop(key, None)  # every client catches up by itself first


class Relay(_Relay[Reader]):
    """Blocking readers: a reader is added for every STREAMS_PER_READER open streams, up
    to `readers`: a blocking XREAD costs Redis a few microseconds for each stream it
    names, paid again on every read, so a reader naming a thousand streams costs about
    a millisecond per relayed event where sixteen cost next to nothing. A stream stays
    with its reader while any client follows it; a new one goes to the least busy."""

    def _moved(self, state: _ReaderState[Reader], key: str) -> None:
        # The blocked XREAD starts over (once, however many clients arrive meanwhile).
        state.version += 1
        state.changed.set()
        state.unblock.set()

    def _start(self, nursery: trio.Nursery, state: _ReaderState[Reader]) -> None:
        nursery.start_soon(self._read, state)
        nursery.start_soon(self._unblock, state)

    async def _unblock(self, state: _ReaderState[Reader]) -> None:
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

    async def _read(self, state: _ReaderState[Reader]) -> None:
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
                self._settle(state, wanted, exc.found)
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
            self._settle(state, wanted, found)


class NotifiedRelay(_Relay[NowReader]):
    """One reader for every stream, told which to read: `touch(key)` (a keyspace
    notification: the stream was appended to) marks it due, `sweep()` marks them all
    (notifications are delivered at most once: the watch sweeps whenever it
    (re)subscribes, and now and then). A read names only the due streams, without
    BLOCK; a stream read to READ_COUNT entries stays due, for the rest."""

    per_reader = 2**31  # one reader: a read costs what it finds, not what is open

    def __init__(self, make_reader: Callable[[], NowReader]) -> None:
        super().__init__(make_reader, 1)

    def touch(self, key: str) -> None:
        state = self._assigned.get(key)
        if state is not None and key in state.positions:
            state.due.add(key)
            state.changed.set()

    def sweep(self) -> None:
        for state in self._states:
            state.due.update(state.positions)
            state.changed.set()

    def _moved(self, state: _ReaderState[NowReader], key: str) -> None:
        state.due.add(key)
        state.changed.set()

    def _start(self, nursery: trio.Nursery, state: _ReaderState[NowReader]) -> None:
        nursery.start_soon(self._read, state)

    async def _read(self, state: _ReaderState[NowReader]) -> None:
        backoff = Backoff()
        failures = 0
        while True:
            if not state.due:
                state.changed = trio.Event()
                await state.changed.wait()
            wanted = {key: state.positions[key] for key in state.due if key in state.positions}
            state.due.clear()
            if not wanted:
                continue
            try:
                found = await state.reader.read_now(wanted, READ_COUNT)
            except StreamsRefused as exc:
                failures = 0
                self._settle(state, wanted, exc.found)
                self._refuse(state, exc.refused)
                continue
            except (TransientError, PermanentError) as exc:
                state.due.update(wanted)  # not read: read them again
                failures += 1
                log.warning("reading streams failed (%s); again in a moment", exc)
                await trio.sleep(backoff.delay(failures))
                continue
            except BaseException:
                state.due.update(wanted)
                raise
            failures = 0
            self._settle(state, wanted, found)

    def _settle(self, state: _ReaderState[NowReader], wanted: Mapping[str, str],
                found: Found) -> None:
        super()._settle(state, wanted, found)
        for key, entries in found:
            if len(entries) >= READ_COUNT and key in wanted and key in state.positions:
                state.due.add(key)  # more may wait behind what one read takes


AnyRelay = Relay | NotifiedRelay
