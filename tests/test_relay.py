"""The gateway's stream relay and its Redis reader.

The relay's logic runs against a fake of our own Reader port (trio's MockClock for
its waits): a client that arrives while a read is in flight still gets every entry in
order, readers are added per open stream up to the limit, an UNBLOCK that came too
early is sent again, a failing read is retried. The reader runs against a real Redis
(password, database, reconnect) and against a scripted RESP server that answers XREAD
with broken and hostile bytes: each is a TransientError or PermanentError saying what
was wrong, and the next read connects afresh.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial

import pytest
import redis
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.adapters import redis_streams
from actors.adapters.redis_cluster_reads import ClusterReader, ClusterWatch
from actors.adapters.redis_connect import RedisConnect
from actors.adapters.redis_streams import BlockingReader
from actors.errors import PermanentError, TransientError
from actors.gateway import relay as relay_module
from actors.gateway.relay import Relay, Subscription
from config import Redis
from messages.ports import Entry
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


async def drain(subscription: Subscription, count: int) -> list[str]:
    ids = []
    with trio.fail_after(30):
        while len(ids) < count:
            ids.append((await subscription.receive.receive())[0])
    return ids


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
        first = relay.subscribe("s", "100-2")
        await reader.reading.wait()
        newcomer = relay.subscribe("s", "0-0")  # while the read from 100-2 is in flight
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
        subscriptions = [relay.subscribe(f"s{n}", "0-0") for n in range(per + 1)]
        assert relay.readers() == 2
        subscriptions += [relay.subscribe(f"t{n}", "0-0") for n in range(4 * per)]
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
        relay.subscribe("a", "0-0")
        await reader.reading.wait()
        relay.subscribe("b", "0-0")  # the read in flight names only "a"
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
        subscription = relay.subscribe("s", "0-0")
        reader.answer(PermanentError("redis: XREAD replied in an unknown shape: test"))
        reader.answer(TransientError("redis: connection reset"))
        reader.answer([("s", [entry(1), entry(2)])])
        assert await drain(subscription, 2) == ["100-1", "100-2"]
        assert log[0] == log[1] == log[2] == {"s": "0-0"}
        nursery.cancel_scope.cancel()


class FakeClusterPipeline:
    """A RedisCluster pipeline whose every XREAD finds nothing."""

    def __init__(self) -> None:
        self.reads = 0

    def xread(self, streams: Mapping[str, str], count: int) -> None:
        self.reads += 1

    def execute(self) -> list[list[object]]:
        return [[] for _ in range(self.reads)]


class FakeCluster:
    def pipeline(self, transaction: bool = False) -> FakeClusterPipeline:
        return FakeClusterPipeline()


async def test_a_cluster_reader_follows_only_the_streams_its_clients_still_want():
    watch = ClusterWatch(FakeCluster(), {}, "sse:chat:")
    reader = ClusterReader(watch, FakeCluster())
    assert await reader.read({"a": "0-0", "b": "0-0"}, 10, 20) == []
    assert set(watch._followers) == {"a", "b"}
    assert await reader.read({"a": "0-0"}, 10, 20) == []  # b's last client left
    assert set(watch._followers) == {"a"}
    watch._touch("b")  # a notification for a stream nobody follows now
    assert "b" not in reader._dirty
    reader.close()
    assert watch._followers == {}


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
                         client_id: bytes = b":7\r\n") -> str:
    """A RESP server on loopback: CLIENT ID gets `client_id`, XREAD gets `xread_reply`,
    then the connection closes."""

    async def serve(stream: trio.SocketStream) -> None:
        buffer = b""
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
                    await stream.send_all(xread_reply)
                    return

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return f"redis://127.0.0.1:{listeners[0].socket.getsockname()[1]}/0"


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
    (b"-ERR something broke\r\n", PermanentError, "ERR something broke"),
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
