"""The gateway's stream relay and its Redis reader.

The relay's logic runs against a fake of our own Reader port (trio's MockClock for
its waits): a client that arrives while a read is in flight still gets every entry in
order, readers are added per open stream up to the limit, an UNBLOCK that came too
early is sent again, a failing read is retried. The reader runs against a real Redis
(password, database, reconnect) and against a scripted RESP server that answers XREAD
with broken and hostile bytes: each is a TransientError or PermanentError saying what
was wrong, and the next read connects afresh.

One client's stream never stalls another's (issue 35): a `Last-Event-ID` Redis would
refuse is a 400 before any read; a stream Redis refuses to read (a key of another
type, a position past 2^64-1 injected below the HTTP check) ends its own clients with
`event: error` (stream_read) while the reader's other streams go on from where they
were; and a user over `gateway.max_streams_per_user` gets 429, however many requests
they send, while other users' streams and requests are served.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from types import SimpleNamespace
from typing import Any, cast

import hiredis
import pytest
import redis
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.adapters.redis import keyspace as redis_keyspace
from actors.adapters.redis import streams as redis_streams
from actors.adapters.redis.connect import RedisConnect
from actors.adapters.redis.keyspace import KeyspaceWatch, node_primary
from actors.adapters.redis.streams import BlockingReader, StreamReads
from actors.errors import PermanentError, StreamsRefused, TransientError
from config import Config, ConfigError, Redis
from gateway import app as app_module
from gateway import relay as relay_module
from gateway.app import OWNER_PREFIX, uuid7
from gateway.http1 import Written
from gateway.relay import Found, NotifiedRelay, Relay, Subscription, entry_key
from gateway.server import run_gateway
from messages.ports import U64_MAX, Entry, is_entry_id
from tests.helpers import gateway_running, until
from tests.test_gateway import bearer, blocks, parse_sse
from tools import local_stack

# ---------------------------------------------------------------- a fake reader


class FakeReader:
    """Reads are answered by the test: each read waits for `answer` (or an unblock)."""

    def __init__(self, log: list[dict[str, str]], *, deaf_unblocks: int = 0) -> None:
        self.log = log  # the streams and positions of every read, in order
        self.unblocks = 0
        self.deaf_unblocks = deaf_unblocks  # UNBLOCKs that arrive before the XREAD does
        self._answer: trio.MemorySendChannel[Sequence[tuple[str, Sequence[Entry]]] | Exception]
        self._answers: trio.MemoryReceiveChannel[Sequence[tuple[str, Sequence[Entry]]] | Exception]
        self._answer, self._answers = trio.open_memory_channel(100)
        self._woken = trio.Event()
        self.reading = trio.Event()

    async def read(self, streams: Mapping[str, str], count: int,
                   block_ms: int) -> Sequence[tuple[str, Sequence[Entry]]]:
        self.log.append(dict(streams))
        self.reading.set()
        self._woken = trio.Event()
        async with trio.open_nursery() as nursery:
            got: list[Sequence[tuple[str, Sequence[Entry]]] | Exception] = []

            async def answered() -> None:
                got.append(await self._answers.receive())
                nursery.cancel_scope.cancel()

            async def woken() -> None:
                await self._woken.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(answered)
            nursery.start_soon(woken)
        self.reading = trio.Event()
        if got and isinstance(got[0], Exception):
            raise got[0]
        return got[0] if got else []

    def answer(self, value: Sequence[tuple[str, Sequence[Entry]]] | Exception) -> None:
        self._answer.send_nowait(value)

    def unblock(self) -> None:  # called in a thread, as the relay calls the real one
        self.unblocks += 1
        if self.unblocks > self.deaf_unblocks:
            trio.from_thread.run_sync(self._woken.set)

    def close(self) -> None:
        pass


def entry(n: int) -> Entry:
    return (f"100-{n}", {"event": "token", "seq": str(n)})


class Client:
    """A client's `take`: it keeps what the reader gives it, or refuses while its
    socket is full (`full`)."""

    def __init__(self) -> None:
        self.got: list[str] = []
        self.full = False
        self.changed = trio.Event()

    def __call__(self, entries: Sequence[Entry]) -> bool:
        if self.full:
            return False
        self.got += [entry_id for entry_id, _ in entries]
        self.changed.set()
        return True


def join(relay: Any, key: str, after: str) -> Subscription:
    """A client following `key` after `after` (its `take` is a Client)."""
    return relay.subscribe(key, after, Client())


async def drain(subscription: Subscription, count: int) -> list[str]:
    """The next `count` entry ids the client was given."""
    client = cast(Client, subscription.take)
    with trio.fail_after(30):
        while len(client.got) < count:
            client.changed = trio.Event()
            await client.changed.wait()
    ids, client.got[:count] = client.got[:count], []
    return ids


async def ended(subscription: Subscription) -> None:
    """Wait for the relay to end this client (a failure, or closing)."""
    with trio.fail_after(30):
        while not subscription.ended:
            await subscription.wake.wait()
            subscription.wake = trio.Event()


async def run_relay(nursery: trio.Nursery, readers: list[FakeReader], most: int = 4) -> Relay:
    made = iter(readers)
    relay = Relay(lambda: next(made), most)
    await nursery.start(relay.run)
    return relay


async def test_a_client_arriving_mid_read_gets_older_entries_first(autojump_clock):
    log: list[dict[str, str]] = []
    reader = FakeReader(log, deaf_unblocks=10**6)  # the read in flight is not woken
    async with trio.open_nursery() as nursery:
        relay = await run_relay(nursery, [reader])
        first = join(relay, "s", "100-2")
        await reader.reading.wait()
        newcomer = join(relay, "s", "0-0")  # while the read from 100-2 is in flight
        reader.answer([("s", [entry(3), entry(4)])])
        assert await drain(first, 2) == ["100-3", "100-4"]
        await reader.reading.wait()
        assert log[-1] == {"s": "0-0"}, "the next read starts where the newcomer stands"
        reader.answer([("s", [entry(n) for n in range(1, 6)])])
        assert await drain(newcomer, 5) == [f"100-{n}" for n in range(1, 6)]
        reader.answer([("s", [entry(6)])])
        assert await drain(first, 2) == ["100-5", "100-6"], "the first client got nothing twice"
        nursery.cancel_scope.cancel()


async def test_a_reader_starts_per_sixteen_streams_up_to_the_limit(autojump_clock):
    readers = [FakeReader([]) for _ in range(8)]
    async with trio.open_nursery() as nursery:
        relay = await run_relay(nursery, readers, most=3)
        per = relay_module.STREAMS_PER_READER
        subscriptions = [join(relay, f"s{n}", "0-0") for n in range(per + 1)]
        assert relay.readers() == 2
        subscriptions += [join(relay, f"t{n}", "0-0") for n in range(4 * per)]
        assert relay.readers() == 3, "never more than gateway.readers"
        for state in relay._states:
            assert len(state.subscriptions) <= 2 * per, "new streams go to the least busy"
        for subscription in subscriptions:
            relay.unsubscribe(subscription)
        assert relay.open_streams() == 0 and not relay._assigned
        nursery.cancel_scope.cancel()


async def test_an_unblock_that_came_too_early_is_sent_again():
    # The real clock: UNBLOCK runs in a thread, which an autojump clock would jump past.
    log: list[dict[str, str]] = []
    reader = FakeReader(log, deaf_unblocks=3)
    async with trio.open_nursery() as nursery:
        relay = await run_relay(nursery, [reader])
        join(relay, "a", "0-0")
        await reader.reading.wait()
        join(relay, "b", "0-0")  # the read in flight names only "a"
        with trio.fail_after(10):  # the fake's read never times out: only a wake ends it
            while len(log) < 2:  # noqa: ASYNC110 (the fake's state)
                await trio.sleep(0.001)
        assert reader.unblocks == 4
        assert log[-1] == {"a": "0-0", "b": "0-0"}
        nursery.cancel_scope.cancel()


async def test_a_failed_read_is_retried_and_nothing_is_lost(autojump_clock):
    log: list[dict[str, str]] = []
    reader = FakeReader(log)
    async with trio.open_nursery() as nursery:
        relay = await run_relay(nursery, [reader])
        subscription = join(relay, "s", "0-0")
        reader.answer(PermanentError("redis: XREAD replied in an unknown shape: test"))
        reader.answer(TransientError("redis: connection reset"))
        reader.answer([("s", [entry(1), entry(2)])])
        assert await drain(subscription, 2) == ["100-1", "100-2"]
        assert log[0] == log[1] == log[2] == {"s": "0-0"}
        nursery.cancel_scope.cancel()


async def test_a_refused_stream_ends_only_its_clients_and_the_rest_keep_their_place(
        autojump_clock):
    log: list[dict[str, str]] = []
    reader = FakeReader(log)
    async with trio.open_nursery() as nursery:
        relay = await run_relay(nursery, [reader])
        good = join(relay, "a", "0-0")
        refused = [join(relay, "b", "0-0"), join(relay, "b", "100-5")]
        await reader.reading.wait()
        assert log[-1] == {"a": "0-0", "b": "0-0"}
        started = trio.current_time()
        reader.answer(StreamsRefused({"b": "WRONGTYPE Operation against a key"},
                                     [("a", [entry(1)])]))
        assert await drain(good, 1) == ["100-1"], "what the others read is delivered"
        for subscription in refused:
            await ended(subscription)
            assert subscription.failure == "WRONGTYPE Operation against a key"
        await reader.reading.wait()
        assert log[-1] == {"a": "100-1"}, "the others go on from their own position"
        assert trio.current_time() == started, "at once: no backoff for the others"
        reader.answer([("a", [entry(2)])])
        assert await drain(good, 1) == ["100-2"]
        assert relay.open_streams() == 1
        for subscription in refused:  # their clients leave: nothing else changes
            relay.unsubscribe(subscription)
        assert relay.open_streams() == 1
        again = join(relay, "b", "0-0")  # a client that comes back is read afresh
        with trio.fail_after(30):  # the read in flight is woken (from a thread), then again
            while "b" not in log[-1]:  # noqa: ASYNC110 (the fake's state)
                await trio.sleep(0.001)
        assert log[-1] == {"a": "100-2", "b": "0-0"}
        reader.answer([("b", [entry(1)])])
        assert await drain(again, 1) == ["100-1"]
        nursery.cancel_scope.cancel()


class FakeBody:
    """A client's socket as an event stream's body: it takes `room` more bytes at once
    (None: any), then only part of a write (the rest pending), then nothing."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.room: int | None = None
        self.left = bytearray()  # what a write_nowait left pending

    async def write(self, data: bytes) -> None:  # the client's own task: it waits
        await self.flush()
        self.written += data

    def write_nowait(self, data: bytes) -> Written:
        if self.left or self.room == 0:
            return Written.REFUSED
        if self.room is None or len(data) <= self.room:
            self.written += data
            self.room = None if self.room is None else self.room - len(data)
            return Written.WRITTEN
        self.written += data[:self.room]
        self.left += data[self.room:]
        self.room = 0
        return Written.WAITING

    @property
    def pending(self) -> bool:
        return bool(self.left)

    async def flush(self) -> None:
        self.written += self.left
        self.left.clear()


def job_entry(job_id: str, n: int, event: str = "token") -> Entry:
    return (f"100-{n}", {"event": event, "jobId": job_id, "attempt": "1", "seq": str(n),
                         "data": json.dumps({"text": f"{n} "})})


async def test_a_client_whose_socket_fills_gets_every_entry_once_in_order(autojump_clock):
    """The reader writes to each client's socket itself. A socket that takes only part
    of a write keeps the rest pending; entries offered meanwhile are refused, and the
    client, once its own task has flushed, catches up from Redis from after the last
    entry it took, and only then is served by the reader again."""
    job_id = uuid7()
    stored = [job_entry(job_id, n) for n in range(1, 301)]

    async def after(key: str, last: str, count: int) -> list[Entry]:
        return [e for e in stored if entry_key(e[0]) > entry_key(last)][:count]

    reader, body = FakeReader([]), FakeBody()
    async with trio.open_nursery() as nursery:
        relay = await run_relay(nursery, [reader])
        gateway = cast(Any, SimpleNamespace(
            relay=relay, reads=SimpleNamespace(after=after), metrics=app_module.GatewayMetrics(),
            config=SimpleNamespace(gateway=SimpleNamespace(heartbeat_s=3600))))
        nursery.start_soon(app_module._relay, gateway, job_id, "s", "0-0", cast(Any, body))
        await reader.reading.wait()
        reader.answer([("s", stored[:10])])  # taken at once, by the reader
        await trio.testing.wait_all_tasks_blocked()
        body.room = 600  # the socket fills: part of the next write waits
        reader.answer([("s", stored[10:20])])
        await trio.testing.wait_all_tasks_blocked()
        reader.answer([("s", stored[20:30])])  # refused: the client is behind
        await trio.testing.wait_all_tasks_blocked()
        body.room = None  # it drains: the task flushed, caught up (two reads of Redis)
        await reader.reading.wait()
        assert reader.log[-1] == {"s": "100-300"}, "served by the reader from where it is"
        stored.append(job_entry(job_id, 301, "done"))
        reader.answer([("s", stored[300:])])
        await trio.testing.wait_all_tasks_blocked()
        ids = [event["id"] for event in parse_sse(body.written.decode())]
        assert ids == [entry_id for entry_id, _ in stored], "each once, in order"
        assert relay.open_streams() == 0, "done: the response ended"
        nursery.cancel_scope.cancel()


class FakeNowReader:
    """A NowReader whose reads are answered by the test (each read waits for one)."""

    def __init__(self) -> None:
        self.log: list[dict[str, str]] = []
        self._answer, self._answers = trio.open_memory_channel[Found | Exception](100)
        self.reading = trio.Event()

    async def read_now(self, streams: Mapping[str, str], count: int) -> Found:
        self.log.append(dict(streams))
        self.reading.set()
        got = await self._answers.receive()
        self.reading = trio.Event()
        if isinstance(got, Exception):
            raise got
        return got

    def answer(self, value: Found | Exception) -> None:
        self._answer.send_nowait(value)

    def close(self) -> None:
        pass


async def notified_relay(nursery: trio.Nursery, reader: FakeNowReader) -> NotifiedRelay:
    relay = NotifiedRelay(lambda: reader)
    await nursery.start(relay.run)
    return relay


async def test_a_notified_relay_reads_only_the_streams_that_grew(autojump_clock):
    reader = FakeNowReader()

    async def read_next(answer: Found) -> dict[str, str]:
        """The streams the next read names, once the one before got `answer`."""
        reader.answer(answer)
        await trio.testing.wait_all_tasks_blocked()
        await reader.reading.wait()
        return reader.log[-1]

    async with trio.open_nursery() as nursery:
        relay = await notified_relay(nursery, reader)
        subscriptions = {key: join(relay, key, "0-0") for key in ("a", "b", "c")}
        await reader.reading.wait()
        assert reader.log[-1] == {"a": "0-0", "b": "0-0", "c": "0-0"}, "new streams: read once"
        relay.touch("b")
        relay.touch("nobody-follows")  # a notification for a stream no client follows
        relay.touch("b")  # a burst: one read
        assert await read_next([]) == {"b": "0-0"}
        relay.touch("b")
        relay.touch("a")
        assert await read_next([("b", [entry(1), entry(2)])]) == {"b": "100-2", "a": "0-0"}, \
            "each from where it stands"
        assert await drain(subscriptions["b"], 2) == ["100-1", "100-2"]
        reader.answer([])
        await trio.testing.wait_all_tasks_blocked()
        assert len(reader.log) == 3, "no notification: no read"
        relay.sweep()  # a notification may have been lost: every stream is read
        await reader.reading.wait()
        assert reader.log[-1] == {"a": "0-0", "b": "100-2", "c": "0-0"}
        reader.answer([])
        await trio.testing.wait_all_tasks_blocked()
        relay.unsubscribe(subscriptions["c"])
        relay.touch("c")  # its last client left
        await trio.testing.wait_all_tasks_blocked()
        assert len(reader.log) == 4 and relay.readers() == 1
        nursery.cancel_scope.cancel()


async def test_a_notified_stream_read_to_its_count_is_read_again_for_the_rest(autojump_clock):
    reader = FakeNowReader()
    full = [(f"100-{n}", {"event": "token"}) for n in range(1, relay_module.READ_COUNT + 1)]
    async with trio.open_nursery() as nursery:
        relay = await notified_relay(nursery, reader)
        join(relay, "s", "0-0")
        reader.answer([("s", full)])
        await reader.reading.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert reader.log[-1] == {"s": full[-1][0]}, "read again at once, no notification"
        reader.answer([])
        nursery.cancel_scope.cancel()


async def test_a_failed_notified_read_is_retried_and_nothing_is_lost(autojump_clock):
    reader = FakeNowReader()
    async with trio.open_nursery() as nursery:
        relay = await notified_relay(nursery, reader)
        subscription = join(relay, "s", "0-0")
        reader.answer(TransientError("redis: connection reset"))
        reader.answer(PermanentError("redis: XREAD replied in an unknown shape: test"))
        reader.answer([("s", [entry(1)])])
        assert await drain(subscription, 1) == ["100-1"]
        assert reader.log == [{"s": "0-0"}] * 3
        await trio.testing.wait_all_tasks_blocked()
        refused = join(relay, "t", "0-0")
        relay.touch("s")
        reader.answer(StreamsRefused({"t": "WRONGTYPE Operation against a key"},
                                     [("s", [entry(2)])]))
        assert await drain(subscription, 1) == ["100-2"]
        await ended(refused)
        assert refused.failure == "WRONGTYPE Operation against a key"
        await trio.testing.wait_all_tasks_blocked()
        relay.touch("t")  # no longer followed: never named again
        relay.touch("s")
        await reader.reading.wait()
        assert reader.log[-1] == {"s": "100-2"}
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- the real reader


def reader_of(url: str, password_env: str = "", control: redis.Redis | None = None,
              **kw: float) -> BlockingReader:
    """A reader; `control` (for UNBLOCK) only where a test unblocks it."""
    where = RedisConnect(Redis(url=url, password_env=password_env, socket_timeout_s=10.0))
    return BlockingReader(where.primary, control, **kw)


async def test_the_reader_reads_a_real_redis_after_each_position(stack, rds):
    rds.delete("rd:a", "rd:b")
    first = rds.xadd("rd:a", {"event": "token", "data": "ü"})
    reader = reader_of(stack.redis.url, control=rds)
    try:
        found = await reader.read({"rd:a": "0-0", "rd:b": "0-0"}, 10, 100)
        assert found == [("rd:a", [(first, {"event": "token", "data": "ü"})])]
        assert await reader.read({"rd:a": first, "rd:b": "0-0"}, 10, 50) == [], "timed out"
        # A blocked read is woken by unblock (from a thread) and answers nothing. An
        # UNBLOCK that reaches Redis before the XREAD does nothing: send it until one lands.
        async with trio.open_nursery() as nursery:
            async def wake() -> None:
                while True:
                    await trio.to_thread.run_sync(reader.unblock)
                    await trio.sleep(0.01)

            nursery.start_soon(wake)
            with trio.fail_after(5):
                assert await reader.read({"rd:a": first}, 10, 60_000) == []
            nursery.cancel_scope.cancel()
        reader.close()  # the next read connects again
        second = rds.xadd("rd:b", {"event": "done"})
        assert await reader.read({"rd:b": "0-0"}, 10, 100) == [("rd:b", [(second, {"event": "done"})])]
    finally:
        reader.close()


async def test_the_reader_authenticates_and_selects_its_database(tmp_path, monkeypatch):
    own = local_stack.start_redis(tmp_path)  # its own server: the suite's stays open
    try:
        base = own.url.rsplit("/", 1)[0]
        with redis.Redis.from_url(base + "/3") as admin:
            admin.config_set("requirepass", "s3cret-for-the-reader")
        with redis.Redis.from_url(base + "/3", password="s3cret-for-the-reader") as authed:
            entry_id = authed.xadd("rd:db3", {"k": "v"}).decode()
        monkeypatch.setenv("RD_TEST_PASSWORD", "s3cret-for-the-reader")
        reader = reader_of(base + "/3", "RD_TEST_PASSWORD")
        try:
            assert await reader.read({"rd:db3": "0-0"}, 10, 100) == [
                ("rd:db3", [(entry_id, {"k": "v"})])]
            assert await reader.read({"rd:db3": entry_id}, 10, 10) == []
        finally:
            reader.close()
        monkeypatch.setenv("RD_TEST_PASSWORD", "wrong-password-here")
        wrong = reader_of(base + "/0", "RD_TEST_PASSWORD")
        with pytest.raises(PermanentError, match="WRONGPASS"):
            await wrong.read({"rd:db3": "0-0"}, 10, 100)
        assert not wrong._conn.connected
    finally:
        own.stop()


# ---------------------------------------------------------------- hostile replies

Serve = Callable[[trio.SocketStream], Awaitable[None]]


async def scripted_redis(nursery: trio.Nursery, xread_reply: bytes,
                         client_id: bytes = b":7\r\n", alone_reply: bytes | None = None) -> str:
    """A RESP server on loopback: CLIENT ID gets `client_id`, XREAD gets `xread_reply`,
    then the connection closes; with `alone_reply`, the XREAD of one stream that follows
    (the reader asking each stream alone after an error reply) gets that first."""

    async def serve(stream: trio.SocketStream) -> None:
        buffer = b""
        replies = [xread_reply] + ([alone_reply] if alone_reply is not None else [])
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
                if b"CLIENT" in buffer and b"ID" in buffer and b"XREAD" not in buffer:
                    buffer = b""
                    await stream.send_all(client_id)
                elif b"STREAMS" in buffer:
                    buffer = b""
                    await stream.send_all(replies.pop(0))
                    if not replies:
                        return

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return f"redis://127.0.0.1:{listeners[0].socket.getsockname()[1]}/0"



async def test_a_command_larger_than_the_socket_takes_is_sent_whole():
    """A command the socket cannot take at once (the server not reading yet) is written
    as the socket frees, every byte once, in order; then its reply is read."""
    big = "k" * (8 * 2**20)
    expected = redis_streams.RespConnection({})._pack(["ECHO", big])
    got = bytearray()
    start_reading = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await start_reading.wait()
            while len(got) < len(expected):
                got.extend(await stream.receive_some(65536))
            await stream.send_all(b"+OK\r\n")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        conn = redis_streams.RespConnection(
            {"host": "127.0.0.1", "port": listeners[0].socket.getsockname()[1]})
        await conn.connect()
        sending = trio.Event()

        async def call() -> None:
            sending.set()
            assert await conn.call("ECHO", big) == "OK"

        with trio.fail_after(30):
            async with trio.open_nursery() as calls:
                calls.start_soon(call)
                await sending.wait()
                await trio.testing.wait_all_tasks_blocked()  # the socket is full: it waits
                assert not got
                start_reading.set()
        conn.drop()
        nursery.cancel_scope.cancel()
    assert bytes(got) == expected


def _bulk(text: str) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(text.encode()), text.encode())


async def test_hostile_pushed_messages_touch_nothing_and_the_watch_goes_on():
    """What a server pushes on the keyspace watch's connection is checked: only a
    pmessage of its own channel naming an XADD touches a stream; any other shape is
    ignored, and bytes that are not RESP end that connection, which is opened again
    (with a sweep, since notifications may have been lost meanwhile)."""
    good = "__keyspace@0__:rdh:good"
    pushes = b"".join([
        b"*3\r\n" + _bulk("psubscribe") + _bulk("rdh:*") + b":1\r\n",  # its reply
        b"*4\r\n" + _bulk("pmessage") + _bulk("p") + b":5\r\n" + _bulk("xadd"),
        b"*4\r\n" + _bulk("pmessage") + _bulk("p") + _bulk("elsewhere:k") + _bulk("xadd"),
        b"*3\r\n" + _bulk("pmessage") + _bulk("p") + _bulk(good),
        b"*4\r\n" + _bulk("message") + _bulk("p") + _bulk(good) + _bulk("xadd"),
        b"+OK\r\n", b":7\r\n", b"*-1\r\n", b"*2\r\n*0\r\n$-1\r\n",
        b"*4\r\n" + _bulk("pmessage") + _bulk("p") + _bulk("__keyspace@0__:rdh:gone")
        + _bulk("del"),
        b"*4\r\n" + _bulk("pmessage") + _bulk("p") + _bulk(good) + _bulk("xadd")])
    connections = 0
    touched: list[str] = []

    async def serve(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            data = b""
            while b"PSUBSCRIBE" not in data:
                data += await stream.receive_some(65536)
            await stream.send_all(pushes)
            while len(touched) < connections:  # noqa: ASYNC110 (the watch's state)
                await trio.sleep(0.01)  # what came before is handled: now, not RESP
            await stream.send_all(b"%%%not resp\r\n")
            await stream.receive_some(65536)  # until the watch hangs up

    sweeps: list[float] = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        watch = KeyspaceWatch(lambda: {"node": {"host": "127.0.0.1", "port": port}},
                              "rdh:", touch=touched.append,
                              sweep=lambda: sweeps.append(trio.current_time()))
        await nursery.start(watch.run)
        with trio.fail_after(30):
            while connections < 2 or len(touched) < 2:  # noqa: ASYNC110 (the watch's state)
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert set(touched) == {"rdh:good"}, "only its channel's XADD, however it came"
    assert watch.notifications >= 4  # the DEL and XADD of each connection
    assert len(sweeps) >= 3  # at start, and around each connection

HOSTILE = [
    (b"+OK\r\n", PermanentError, "the reply is str, not an array"),
    (b":12\r\n", PermanentError, "the reply is int, not an array"),
    (b"*1\r\n*2\r\n$1\r\ns\r\n:5\r\n", PermanentError, "a stream is not"),
    (b"*1\r\n*1\r\n$1\r\ns\r\n", PermanentError, "a stream is not"),
    (b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$5\r\nnot-1\r\n*0\r\n", PermanentError,
     "an entry of 's' is not"),
    (b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*1\r\n$1\r\nk\r\n", PermanentError,
     "has no field/value pairs"),
    (b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nk\r\n:3\r\n",
     PermanentError, "has no field/value pairs"),
    (b"-LOADING Redis is loading the dataset in memory\r\n", TransientError, "LOADING"),
    (b"%%%garbage\r\n", TransientError, "ProtocolError"),
    (b"*3\r\n$2\r\nab", TransientError, "closed the connection"),  # cut mid-reply
    (b"", TransientError, "closed the connection"),
]


@pytest.mark.parametrize(("reply", "error", "message"), HOSTILE)
async def test_a_hostile_xread_reply_is_a_clear_error(reply, error, message):
    async with trio.open_nursery() as nursery:
        reader = reader_of(await scripted_redis(nursery, reply), reply_timeout_s=5)
        with pytest.raises(error, match=message) as raised:
            await reader.read({"s": "0-0"}, 10, 100)
        assert str(raised.value).startswith("redis: ")
        assert not reader._conn.connected, "a broken connection is not used again"
        nursery.cancel_scope.cancel()


RANGE_HOSTILE = [
    (b"_\r\n", "XRANGE replied in an unknown shape: the reply is NoneType, not an array"),
    (b"+OK\r\n", "a reply in an unknown shape \\(IndexError"),
    (b":12\r\n", "a reply in an unknown shape \\(TypeError"),
    (b"*1\r\n_\r\n", "an entry of 's' is not"),
    (b"*1\r\n*2\r\n$5\r\nnot-1\r\n*0\r\n", "an entry of 's' is not"),
    (b"*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n:1\r\n:2\r\n", "has no field/value pairs"),
]
HELLO = b"%1\r\n$5\r\nproto\r\n:3\r\n"


async def range_server(nursery: trio.Nursery, reply: bytes, hello: bytes = HELLO) -> str:
    """A RESP3 server on loopback: HELLO gets its map, XRANGE and XREVRANGE get `reply`,
    anything else +OK."""
    async def serve(stream: trio.SocketStream) -> None:
        parser = hiredis.Reader()
        async with stream:
            while data := await stream.receive_some(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    name = command[0].upper()
                    await stream.send_all(
                        reply if name in (b"XRANGE", b"XREVRANGE")
                        else hello if name == b"HELLO" else b"+OK\r\n")

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return f"redis://127.0.0.1:{listeners[0].socket.getsockname()[1]}/0"


@pytest.mark.parametrize(("reply", "message"), RANGE_HOSTILE)
async def test_a_hostile_xrange_reply_is_a_clear_error(reply, message):
    """The gateway's own reads of a stream (a client catching up, a resume's last entry,
    a job's first user) check the reply as the reader does: a clear error, no crash."""
    async with trio.open_nursery() as nursery:
        url = await range_server(nursery, reply)
        reads = StreamReads(Redis(url=url, password_env="", socket_timeout_s=5.0))
        for read in (partial(reads.after, "s", "0-0", 10), partial(reads.last, "s"),
                     partial(reads.first_user, "s", "job")):
            with pytest.raises(PermanentError, match=message):
                await read()
        reads.close()
        nursery.cancel_scope.cancel()


async def test_a_handshake_reply_redis_py_cannot_read_is_a_clear_error():
    """redis-py checks no shapes: a server answering HELLO with +OK makes its handshake
    raise AttributeError, which the gateway's reads report as a PermanentError."""
    async with trio.open_nursery() as nursery:
        url = await range_server(nursery, b"*0\r\n", hello=b"+OK\r\n")
        reads = StreamReads(Redis(url=url, password_env="", socket_timeout_s=5.0))
        with pytest.raises(PermanentError, match=r"a reply in an unknown shape \(AttributeError"):
            await reads.owner_key("k")
        reads.close()
        nursery.cancel_scope.cancel()


async def test_a_deleted_entry_reads_as_no_fields():
    reply = b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*-1\r\n"
    async with trio.open_nursery() as nursery:
        reader = reader_of(await scripted_redis(nursery, reply))
        assert await reader.read({"s": "0-0"}, 10, 100) == [("s", [("1-1", {})])]
        reader.close()
        nursery.cancel_scope.cancel()


async def test_an_oversized_reply_and_a_bad_client_id_are_refused(monkeypatch):
    monkeypatch.setattr(redis_streams, "MAX_REPLY_BYTES", 1000)
    big = b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nk\r\n$5000\r\n" + b"x" * 5000
    async with trio.open_nursery() as nursery:
        reader = reader_of(await scripted_redis(nursery, big))
        with pytest.raises(PermanentError, match="over 1000 bytes"):
            await reader.read({"s": "0-0"}, 10, 100)
        odd = reader_of(await scripted_redis(nursery, b"*-1\r\n", client_id=b"$2\r\nno\r\n"))
        with pytest.raises(PermanentError, match="CLIENT ID replied str"):
            await odd.read({"s": "0-0"}, 10, 100)
        nursery.cancel_scope.cancel()


async def test_a_reply_that_never_ends_times_out():
    async with trio.open_nursery() as nursery:
        url = await scripted_redis(nursery, b"*1\r\n")  # then the server closes
        reader = reader_of(url, reply_timeout_s=0.2)
        with pytest.raises(TransientError):
            await reader.read({"s": "0-0"}, 10, 10)
        nursery.cancel_scope.cancel()


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | st.builds(
    lambda head, tail: head + tail,
    st.sampled_from([b"*1\r\n*2\r\n$1\r\ns\r\n", b"*1\r\n", b"*2\r\n$1\r\ns\r\n*1\r\n*2\r\n"]),
    st.binary(max_size=120)))
def test_any_bytes_as_a_reply_are_entries_or_a_clear_error(reply):
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            reader = reader_of(await scripted_redis(nursery, reply), reply_timeout_s=0.5)
            try:
                found = await reader.read({"s": "0-0"}, 10, 10)
            except (TransientError, PermanentError) as exc:
                assert str(exc).startswith("redis: ")
            else:
                for key, entries in found:
                    assert isinstance(key, str)
                    for entry_id, fields in entries:
                        assert isinstance(entry_id, str) and isinstance(fields, dict)
            reader.close()
            nursery.cancel_scope.cancel()

    trio.run(main)


# ---------------------------------------------------------------- one stream's fault


async def test_a_stream_redis_refuses_fails_alone_on_a_real_reader(stack, rds):
    keys = {name: f"rd:{name}:{uuid.uuid4().hex}" for name in ("ok", "string", "list",
                                                               "hash", "huge")}
    rds.set(keys["string"], "not a stream")
    rds.rpush(keys["list"], "not a stream")
    rds.hset(keys["hash"], "event", "token")
    first = rds.xadd(keys["ok"], {"event": "token"})
    rds.xadd(keys["huge"], {"event": "token"})
    # Ids Redis refuses, set below the HTTP check: past 2^64-1 in either part.
    positions = {keys["ok"]: "0-0", keys["string"]: "0-0", keys["list"]: "0-0",
                 keys["hash"]: "0-0", keys["huge"]: "99999999999999999999-0",
                 keys["huge"] + ":seq": f"0-{U64_MAX + 1}"}
    reader = reader_of(stack.redis.url)
    try:
        with pytest.raises(StreamsRefused) as refused:
            await reader.read(positions, 10, 100)
        reasons = refused.value.refused
        assert set(reasons) == set(positions) - {keys["ok"]}
        assert all(reasons[keys[name]].startswith("WRONGTYPE") for name in ("string", "list",
                                                                             "hash"))
        assert "Invalid stream ID" in reasons[keys["huge"]]
        assert refused.value.found == [(keys["ok"], [(first, {"event": "token"})])]
        assert reader._conn.connected, "every reply was read: the connection goes on"
        # Alone, a stream of another type is still its own fault (nothing to compare).
        with pytest.raises(StreamsRefused):
            await reader.read({keys["string"]: "0-0"}, 10, 100)
        assert await reader.read({keys["ok"]: first}, 10, 20) == []
    finally:
        reader.close()


async def test_a_relay_on_a_real_reader_ends_refused_streams_and_serves_the_rest(stack, rds):
    ok, wrong, huge = (f"rd:{name}:{uuid.uuid4().hex}" for name in ("ok", "wrong", "huge"))
    rds.set(wrong, "not a stream")
    rds.xadd(huge, {"event": "token"})
    first = rds.xadd(ok, {"event": "token"})
    relay = Relay(lambda: reader_of(stack.redis.url, control=rds), 1)  # one reader for all
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        good = join(relay, ok, "0-0")
        assert await drain(good, 1) == [first]
        # While the reader is blocked on `ok`: two clients whose streams Redis refuses.
        bad = [join(relay, wrong, "0-0"), join(relay, huge, "99999999999999999999-0")]
        for subscription in bad:
            await ended(subscription)
        assert (bad[0].failure or "").startswith("WRONGTYPE")
        assert "Invalid stream ID" in (bad[1].failure or "")
        later = [rds.xadd(ok, {"event": "token"}) for _ in range(3)]
        assert await drain(good, 3) == later, "the other stream goes on from its place"
        assert relay.readers() == 1 and relay.open_streams() == 1
        nursery.cancel_scope.cancel()



async def test_a_notified_relay_on_a_real_redis_is_told_of_every_append(stack, rds, monkeypatch):
    """The watch turns notifications on and the relay reads each stream when told: no
    sweep here (REFRESH_S is an hour), so every entry came by its notification."""
    monkeypatch.setattr(redis_keyspace, "REFRESH_S", 3600)
    prefix = f"rdn:{uuid.uuid4().hex}:"
    keys = [f"{prefix}{n}" for n in range(20)]
    where = RedisConnect(Redis(url=stack.redis.url, password_env="", socket_timeout_s=10.0))
    relay = NotifiedRelay(lambda: reader_of(stack.redis.url))
    watch = KeyspaceWatch(partial(node_primary, where.primary, rds), prefix,
                          touch=relay.touch, sweep=relay.sweep)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        subscriptions = [join(relay, key, "0-0") for key in keys]
        await nursery.start(watch.run)
        flags = rds.config_get("notify-keyspace-events")["notify-keyspace-events"]
        assert {"K", "t"} <= set(flags) or {"K", "A"} <= set(flags), flags

        def write() -> list[list[str]]:
            return [[rds.xadd(key, {"event": "token", "n": str(n)}) for key in keys]
                    for n in range(10)]

        written = await trio.to_thread.run_sync(write)
        for index, subscription in enumerate(subscriptions):
            assert await drain(subscription, 10) == [row[index] for row in written]
        assert watch.notifications >= 200 and relay.readers() == 1
        nursery.cancel_scope.cancel()


async def test_a_redis_that_refuses_config_is_read_by_blocking_readers_unless_told_otherwise(
        gw_config, tmp_path):
    own = local_stack.start_redis(tmp_path, extra=["--rename-command", "CONFIG", ""])
    try:
        client = redis.Redis.from_url(own.url, decode_responses=True)
        config = gw_config(CHAT_ACTORS__REDIS__URL=own.url)
        job_id, stream = new_job(client, config, "alice")
        async with gateway_running(config) as (handle, http):
            assert isinstance(handle.gateway.relay, Relay)  # auto: blocking, and it works
            got: dict[str, str] = {}
            async with trio.open_nursery() as nursery:
                await nursery.start(follow, http, job_id, "alice", got)
                finish(client, stream, job_id, "alice", 3)
        assert [e["event"] for e in parse_sse(got[job_id])] == [
            "started", "token", "token", "token", "done"]
        refused = gw_config(CHAT_ACTORS__REDIS__URL=own.url,
                            CHAT_ACTORS__GATEWAY__STREAM_READS="notified")
        with pytest.raises(ConfigError, match=r"gateway.stream_reads: .*notify-keyspace-events"):
            await run_gateway(refused, handle_signals=False)
        client.close()
    finally:
        own.stop()

ALONE = [
    # Refused together and alone, for the stream's own reason: that stream's fault.
    (b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
     b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
     StreamsRefused, "1 stream"),
    # Every stream refused alike for no reason of its own: the server's, retried for all.
    (b"-ERR something broke\r\n", b"-ERR something broke\r\n", PermanentError,
     "ERR something broke"),
    (b"-ERR something broke\r\n", b"-LOADING Redis is loading the dataset\r\n",
     TransientError, "LOADING"),
    # Refused together, read alone without an error and nothing found: raised as it was
    # (so a reader never spins on it).
    (b"-ERR Invalid stream ID specified as stream command argument\r\n", b"*-1\r\n",
     PermanentError, "Invalid stream ID"),
]


@pytest.mark.parametrize(("reply", "alone", "error", "message"), ALONE)
async def test_an_error_reply_is_put_down_to_a_stream_only_when_it_is_its_own(
        reply, alone, error, message):
    async with trio.open_nursery() as nursery:
        reader = reader_of(await scripted_redis(nursery, reply, alone_reply=alone),
                           reply_timeout_s=5)
        with pytest.raises(error, match=message) as raised:
            await reader.read({"s": "0-0"}, 10, 100)
        assert type(raised.value) is error
        assert str(raised.value).startswith("redis: ")
        reader.close()
        nursery.cancel_scope.cancel()


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"\A[0-9]{1,22}-[0-9]{1,22}\Z") | st.sampled_from([
    f"{U64_MAX}-{U64_MAX}", f"{U64_MAX + 1}-0", f"0-{U64_MAX + 1}", "99999999999999999999-0",
    "00000000000000000001-0", "0000000000000000000001-0", "1-0\n", "\u0661-\u0660", "1_0-0",
    "+1-0", "-1-0", "1--0", "1-", "-0", "1", "1-0-0", " 1-0", "0x1-0", "1-0\x00"]))
def test_every_entry_id_the_gateway_takes_redis_takes(stack, text):
    """Differential, against a real Redis: an id the gateway takes (Last-Event-ID, an
    entry of a reply) never fails a read; one it refuses Redis refuses too, or it is a
    form other than two numbers of at most 20 digits joined by `-` (Redis also takes
    "7", "$" or 30 leading zeros; no id it writes looks like that)."""
    with redis.Redis.from_url(stack.redis.url) as client:
        try:
            client.xrange("rd:differential", text, text)
            redis_takes = True
        except redis.ResponseError:
            redis_takes = False
    if is_entry_id(text):
        assert redis_takes, text
    elif redis_takes:
        assert not (text.count("-") == 1 and all(
            part.isascii() and part.isdigit() and len(part) <= 20
            for part in text.split("-"))), text


# ---------------------------------------------------------------- through the gateway


def new_job(rds: redis.Redis, config: Config, user: str) -> tuple[str, str]:
    """A job of `user` whose `started` is in its stream, written as the worker would."""
    job_id = uuid7()
    rds.set(OWNER_PREFIX + job_id, user, ex=600)
    stream = config.job_keys(job_id).stream
    append(rds, stream, job_id, user, "started", 0, {"model": "m"})
    return job_id, stream


def append(rds: Any, stream: str, job_id: str, user: str, event: str, seq: int,
           data: dict[str, Any]) -> str:
    return str(rds.xadd(stream, {"event": event, "jobId": job_id, "userId": user,
                                 "sessionId": "s", "attempt": 1, "seq": seq, "ts": 0,
                                 "data": json.dumps(data)}))


def finish(rds: Any, stream: str, job_id: str, user: str, tokens: int) -> None:
    for n in range(1, tokens + 1):
        append(rds, stream, job_id, user, "token", n, {"text": f"{n} "})
    append(rds, stream, job_id, user, "done", tokens + 1,
           {"status": "completed", "partial": False})


async def follow(http: Any, job_id: str, user: str, into: dict[str, str],
                 *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Read a job's events to the response's end into `into[job_id]`; started once
    its `started` has arrived (or its response ended)."""
    text, reported = "", False
    async with http.stream("GET", f"/v1/jobs/{job_id}/events",
                           headers=bearer(user)) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_text():
            text += chunk
            if not reported and "event: started" in text:
                reported = True
                task_status.started()
    into[job_id] = text
    if not reported:
        task_status.started()


async def test_a_forged_last_event_id_is_a_400_before_any_read(gw_config, rds):
    config = gw_config(CHAT_ACTORS__GATEWAY__STREAM_WAIT_S="600")
    mine, mine_stream = new_job(rds, config, "mallory")  # running: not done
    theirs, theirs_stream = new_job(rds, config, "bob")
    finish(rds, theirs_stream, theirs, "bob", 5)
    forged: list[str | bytes] = [
        "99999999999999999999-0", f"{U64_MAX + 1}-0", f"0-{U64_MAX + 1}",
        "1" * 21 + "-0", "-1-0", "1-", "1", "1-0-0", "1_0-0", "+1-0", "1-0x",
        "\u0661-\u0660".encode(), b"1-0\xff", "$", ">", "0-0; DROP"]
    async with gateway_running(config) as (handle, http):
        with trio.fail_after(60):  # an unknown job would be waited for 600 s: not here
            for job_id in (mine, uuid7()):
                for value in forged:
                    headers = {name.encode(): text.encode()
                               for name, text in bearer("mallory").items()}
                    headers[b"Last-Event-ID"] = value if isinstance(value, bytes) else value.encode()
                    response = await http.get(f"/v1/jobs/{job_id}/events", headers=headers)
                    assert response.status_code == 400, value
                    assert response.json()["error"]["field"] == "Last-Event-ID", value
                    assert str(U64_MAX) in response.json()["error"]["message"]
            # The largest id Redis takes is taken: nothing is after it (204, done) for bob.
            top = await http.get(f"/v1/jobs/{theirs}/events", headers=bearer("bob") | {
                "Last-Event-ID": f"{U64_MAX}-{U64_MAX}"})
            assert top.status_code == 204
            got: dict[str, str] = {}
            await follow(http, theirs, "bob", got)
        slots = handle.gateway.stream_slots
        await until(lambda: not slots.held)  # a refusal took no slot; bob's came back
    events = parse_sse(got[theirs])
    assert [e["data"]["seq"] for e in events] == list(range(7))
    assert events[-1]["event"] == "done"
    assert mine_stream  # her own job was never read from a forged position


async def test_an_unreadable_stream_ends_its_client_with_stream_read_and_others_go_on(
        gw_config, rds):
    config = gw_config()
    bob_job, bob_stream = new_job(rds, config, "bob")
    hostile: dict[str, str] = {}  # user -> a job of theirs whose stream key is no stream
    for user, plant in (("mallory", lambda key: rds.set(key, "x")),
                        ("eve", lambda key: rds.rpush(key, "x")),
                        ("trudy", lambda key: rds.hset(key, "event", "done"))):
        job_id = uuid7()
        rds.set(OWNER_PREFIX + job_id, user, ex=600)
        plant(config.job_keys(job_id).stream)
        hostile[user] = job_id
    got: dict[str, str] = {}
    async with gateway_running(config) as (handle, http), trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await nursery.start(follow, http, bob_job, "bob", got)
            for user, job_id in hostile.items():
                await follow(http, job_id, user, got)  # returns once the response ends
                (error,) = blocks(got[job_id])
                assert error["event"] == "error" and "id" not in error, got[job_id]
                data = json.loads(error["data"])
                assert data["code"] == "stream_read" and data["retryable"] is False
                assert "WRONGTYPE" in data["message"]
                assert set(data) == {"code", "message", "retryable"}
            assert handle.gateway.relay.readers() == 1, "bob's reader was theirs too"
            await trio.to_thread.run_sync(finish, rds, bob_stream, bob_job, "bob", 20)
        slots = handle.gateway.stream_slots
        await until(lambda: not slots.held)  # every slot given back, the error's too
    events = parse_sse(got[bob_job])
    assert [e["data"]["seq"] for e in events] == list(range(22)), "bob missed nothing"
    assert "".join(e["data"].get("text", "") for e in events) == "".join(
        f"{n} " for n in range(1, 21))


async def _waiting(port: int, path: str, user: str, statuses: trio.MemorySendChannel[int]
                   ) -> None:
    """GET `path` on a bare socket, report the status once one comes (a wait for a job
    that never starts reports nothing) and hold the connection until cancelled."""
    headers = "".join(f"{k}: {v}\r\n" for k, v in bearer(user).items())
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: t\r\n{headers}\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            piece = await stream.receive_some()
            assert piece
            data += piece
        await statuses.send(int(data.split()[1]))
        await trio.sleep_forever()  # an open stream stays open


async def test_the_33rd_stream_of_one_user_is_429_and_another_user_still_opens_one(
        gw_config, rds):
    config = gw_config(CHAT_ACTORS__GATEWAY__STREAM_WAIT_S="600")
    most = config.gateway.max_streams_per_user
    assert most == 32, "the default"
    alice_job, alice_stream = new_job(rds, config, "alice")
    bob_job, bob_stream = new_job(rds, config, "bob")
    got: dict[str, str] = {}
    send, statuses = trio.open_memory_channel[int](100)
    async with gateway_running(config) as (handle, http), trio.open_nursery() as nursery:
        slots = handle.gateway.stream_slots
        with trio.fail_after(60):
            for _ in range(most // 2):  # open streams...
                nursery.start_soon(_waiting, handle.port, f"/v1/jobs/{alice_job}/events",
                                   "alice", send)
            for _ in range(most - most // 2):  # ...and waits for jobs not started yet
                nursery.start_soon(_waiting, handle.port, f"/v1/jobs/{uuid7()}/events",
                                   "alice", send)
            for _ in range(most // 2):
                assert await statuses.receive() == 200
            await until(lambda: slots.held.get("alice") == most)
            for job_id in (alice_job, uuid7()):  # one more of either kind
                over = await http.get(f"/v1/jobs/{job_id}/events", headers=bearer("alice"))
                assert over.status_code == 429
                assert "gateway.max_streams_per_user" in over.json()["error"]["message"]
                assert int(over.headers["retry-after"]) == 600
            assert slots.held["alice"] == most, "a refusal takes no slot"
            async with trio.open_nursery() as bobs:  # another user is served meanwhile
                await bobs.start(follow, http, bob_job, "bob", got)
                await trio.to_thread.run_sync(finish, rds, bob_stream, bob_job, "bob", 3)
            # Alice's job ends: her open streams end and give their slots back.
            await trio.to_thread.run_sync(finish, rds, alice_stream, alice_job, "alice", 1)
            await until(lambda: slots.held.get("alice") == most - most // 2)
            await follow(http, alice_job, "alice", got)
        assert [e["event"] for e in parse_sse(got[alice_job])] == ["started", "token", "done"]
        assert [e["data"]["seq"] for e in parse_sse(got[bob_job])] == [0, 1, 2, 3, 4]
        nursery.cancel_scope.cancel()


async def test_a_burst_of_waits_for_unknown_jobs_is_capped_and_costs_others_nothing(
        gw_config, rds):
    """The review's 800 waits for unknown jobs from one user (each polls Redis) slowed
    every other user's requests: now all but 32 are refused at once, without a read,
    and another user's POST and stream are served while those 32 still wait."""
    config = gw_config(CHAT_ACTORS__GATEWAY__STREAM_WAIT_S="600")
    burst, most = 400, config.gateway.max_streams_per_user
    bob_job, bob_stream = new_job(rds, config, "bob")
    got: dict[str, str] = {}
    send, statuses = trio.open_memory_channel[int](burst)
    async with gateway_running(config) as (handle, http), trio.open_nursery() as nursery:
        slots = handle.gateway.stream_slots
        with trio.fail_after(120):
            for _ in range(burst):
                nursery.start_soon(_waiting, handle.port, f"/v1/jobs/{uuid7()}/events",
                                   "mallory", send)
            refused = [await statuses.receive() for _ in range(burst - most)]
            assert refused == [429] * (burst - most)
            assert slots.held == {"mallory": most}, "the rest wait, as many as the limit"
            posted = await http.post("/v1/chat", json={"sessionId": "s-bob", "message": "hi"},
                                     headers=bearer("bob"))
            assert posted.status_code == 202
            async with trio.open_nursery() as bobs:  # to the end of bob's stream
                await bobs.start(follow, http, bob_job, "bob", got)
                await trio.to_thread.run_sync(finish, rds, bob_stream, bob_job, "bob", 3)
            # All of it while every one of mallory's waits still waits.
            assert slots.held["mallory"] == most
            assert statuses.statistics().current_buffer_used == 0
        nursery.cancel_scope.cancel()
    assert [e["data"]["seq"] for e in parse_sse(got[bob_job])] == [0, 1, 2, 3, 4]
