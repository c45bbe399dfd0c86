"""The gateway's side of Redis: reading job streams, owner and idempotency keys.

A `BlockingReader` holds one connection and waits in XREAD BLOCK on many streams at
once (one round trip for every client it serves), on the event loop itself; `unblock`
wakes it from another connection (CLIENT UNBLOCK) when the set of streams changes.
Everything else is request/reply on a small redis-py pool, each call in a worker
thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import hiredis
import redis
import trio
from redis.exceptions import RedisClusterException

from actors.adapters.redis.connect import RedisConnect
from actors.adapters.redis.events import translate
from actors.errors import PermanentError, StreamsRefused, TransientError
from config import Redis as RedisConfig
from messages.ports import Entry, is_entry_id

T = TypeVar("T")
READ_BYTES = 65536
MAX_REPLY_BYTES = 64 * 2**20  # an XREAD of 256 entries per stream stays far below
# What redis-py's parsing raises on a reply it did not expect (it checks no shapes).
REDIS_PY_PARSING = (TypeError, ValueError, AttributeError, IndexError, KeyError)
MAX_PACKED = 200_000  # encoded arguments kept (stream keys, entry ids) before starting over


# KEYS: the key. ARGV: the value it must still hold, its new value ('' deletes it).
_SETTLE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL') end
return 1
"""


class StreamReads:
    """Request/reply reads and the gateway's own keys (owner of a job, idempotency)."""

    def __init__(self, redis_config: RedisConfig) -> None:
        self._limiter = trio.CapacityLimiter(8)
        try:
            self._connect = RedisConnect(
                redis_config, socket_timeout=redis_config.socket_timeout_s,
                socket_connect_timeout=5.0, decode_responses=True)
        except (redis.RedisError, RedisClusterException) as exc:
            raise PermanentError(f"redis: {exc} (redis.cluster = true needs a Redis Cluster "
                                 "at redis.url)", code="redis") from exc
        self._client: Any = self._connect.client

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, one redis-py call, in a worker thread. redis-py's own parsing of a
        reply it did not expect (a broken or hostile server, from the handshake on)
        raises whatever its code meets: that is a PermanentError naming it too."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except redis.RedisError as exc:
            raise translate(exc) from exc
        except REDIS_PY_PARSING as exc:
            raise PermanentError(f"redis: a reply in an unknown shape ({type(exc).__name__}: "
                                 f"{exc})", code="redis") from exc

    @property
    def client(self) -> Any:
        """The request/reply client (a RedisCluster in cluster mode), for the cluster's
        readers."""
        return self._client

    def primary(self) -> dict[str, Any]:
        """Where to open a connection of our own to the primary (blocking)."""
        return self._connect.primary()

    def reader(self) -> BlockingReader:
        return BlockingReader(self._connect.primary, self._client,
                              primary_only=self._connect.sentinel is not None)

    async def ping(self) -> None:
        await self._run(self._client.ping)

    async def remember_owner(self, key: str, user_id: str, ttl_s: int) -> None:
        await self._run(lambda: self._client.set(key, user_id, ex=ttl_s))

    async def owner_key(self, key: str) -> str | None:
        return await self._run(self._client.get, key)

    async def first_user(self, stream: str, job_id: str) -> str | None:
        """The userId of the job's first entry in `stream` (None: nothing yet)."""
        def first() -> str | None:
            for _, fields in _ranged(stream, self._client.xrange(stream, "-", "+", count=64)):
                if fields.get("jobId") == job_id:
                    return fields.get("userId")
            return None
        return await self._run(first)

    async def claim_once(self, key: str, value: str, ttl_s: int) -> str:
        """Set `key` to `value` unless it holds one already; return what it holds."""
        def claim() -> str:
            pipe = self._client.pipeline()
            pipe.set(key, value, nx=True, ex=ttl_s)
            pipe.get(key)
            return pipe.execute()[1]
        return await self._run(claim)

    async def settle(self, key: str, expected: str, value: str) -> None:
        """While `key` still holds `expected`, make it `value` (its expiry kept), or
        delete it when `value` is empty: one script, so a key taken over meanwhile
        is left alone."""
        await self._run(lambda: self._client.eval(_SETTLE, 1, key, expected, value))

    async def after(self, stream: str, after_id: str, count: int) -> list[Entry]:
        return await self._run(lambda: _ranged(stream, self._client.xrange(
            stream, f"({after_id}", "+", count=count)))

    async def last(self, stream: str) -> Entry | None:
        entries = await self._run(lambda: _ranged(stream, self._client.xrevrange(
            stream, "+", "-", count=1)))
        return entries[0] if entries else None

    def close(self) -> None:
        self._connect.close()


class RespConnection:
    """One Redis connection on Trio's own sockets: RESP2 commands, replies parsed by
    hiredis (C), every size bounded, every fault a TransientError or PermanentError."""

    def __init__(self, target: Mapping[str, Any], connect_timeout_s: float = 5.0) -> None:
        self.target = dict(target)
        self._connect_timeout_s = connect_timeout_s
        self._stream: trio.abc.Stream | None = None
        self._parser: Any = None
        self._packed: dict[str, bytes] = {}

    @property
    def connected(self) -> bool:
        return self._stream is not None

    async def connect(self) -> None:
        target = self.target
        with trio.fail_after(self._connect_timeout_s):
            if "path" in target:
                stream: trio.abc.Stream = await trio.open_unix_socket(target["path"])
            else:
                stream = await trio.open_tcp_stream(target.get("host", "localhost"),
                                                    int(target.get("port", 6379)))
                if target.get("connection_class") is redis.SSLConnection:
                    tls = trio.SSLStream(stream, ssl.create_default_context(),
                                         server_hostname=target.get("host"))
                    await tls.do_handshake()
                    stream = tls
            self._stream = stream
            self._parser = hiredis.Reader(encoding="utf-8", errors="replace")
            if target.get("password"):
                user = [target["username"]] if target.get("username") else []
                await self.call("AUTH", *user, target["password"])
            if int(target.get("db") or 0):
                await self.call("SELECT", str(target["db"]))

    def _pack(self, args: Sequence[str]) -> bytes:
        """A RESP command; each argument's encoding is kept, since the same stream keys
        and most of the same ids go into every XREAD."""
        packed = self._packed
        if len(packed) > MAX_PACKED:
            packed.clear()
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            part = packed.get(arg)
            if part is None:
                data = arg.encode()
                packed[arg] = part = b"$%d\r\n%s\r\n" % (len(data), data)
            parts.append(part)
        return b"".join(parts)

    async def send(self, *args: str) -> None:
        await self._send(self._pack(args))

    async def _send(self, data: bytes) -> None:
        """`data` written. On a plain socket directly: a command is small and the socket
        takes it at once nearly always, so the relay does not pay Trio's SocketStream
        (tens of µs a call in checks and checkpoints) on every read; it waits only when
        the socket is full. The reply awaited next is the checkpoint."""
        stream = self._stream
        assert stream is not None
        if not isinstance(stream, trio.SocketStream):
            await stream.send_all(data)
            return
        view = memoryview(data)
        while view:
            try:
                sent = os.write(stream.socket.fileno(), view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(stream.socket)
                continue
            view = view[sent:]

    async def _receive(self) -> bytes | bytearray:
        """What the server sent next (b"": it closed the connection); on a plain socket
        read directly, waiting only when nothing is there (a checkpoint either way)."""
        stream = self._stream
        assert stream is not None
        if not isinstance(stream, trio.SocketStream):
            return await stream.receive_some(READ_BYTES)
        waited = False
        while True:
            try:
                data = os.read(stream.socket.fileno(), READ_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(stream.socket)
                waited = True
                continue
            if not waited:
                await trio.lowlevel.checkpoint()  # others run even when data is there
            return data

    async def reply(self) -> Any:
        """The next reply (or pushed message); an error reply raises."""
        (reply,) = await self._replies(1)
        if isinstance(reply, hiredis.ReplyError):
            raise translate(redis.ResponseError(str(reply)))
        return reply

    async def _replies(self, count: int) -> list[Any]:
        """The next `count` replies, an error reply kept in its place (a ReplyError);
        together at most MAX_REPLY_BYTES."""
        assert self._stream is not None
        replies: list[Any] = []
        received = 0
        while len(replies) < count:
            if (reply := self._parser.gets()) is not False:
                replies.append(reply)
                continue
            data = await self._receive()
            if not data:
                raise TransientError("redis: the server closed the connection",
                                     kind="connection")
            received += len(data)
            if received > MAX_REPLY_BYTES:
                raise PermanentError(f"redis: a reply over {MAX_REPLY_BYTES} bytes",
                                     code="redis")
            self._parser.feed(data)
        return replies

    async def pushed(self) -> list[Any]:
        """Every message already received (Pub/Sub), or, when none is, those of the next
        read from the socket: under load one read carries many. An error reply raises;
        a message is at most READ_BYTES times the parser's buffer, never unbounded."""
        assert self._stream is not None
        messages: list[Any] = []
        while True:
            while (message := self._parser.gets()) is not False:
                if isinstance(message, hiredis.ReplyError):
                    raise translate(redis.ResponseError(str(message)))
                messages.append(message)
            if messages:
                return messages
            data = await self._receive()
            if not data:
                raise TransientError("redis: the server closed the connection",
                                     kind="connection")
            self._parser.feed(data)
            if self._parser.len() > MAX_REPLY_BYTES:
                raise PermanentError(f"redis: a message over {MAX_REPLY_BYTES} bytes",
                                     code="redis")

    async def call(self, *args: str) -> Any:
        await self.send(*args)
        return await self.reply()

    async def pipeline(self, commands: Sequence[Sequence[str]]) -> list[Any]:
        """Each command's reply, sent in one write: an error reply stays in its place (a
        hiredis.ReplyError), so one command's error does not hide the others' replies."""
        await self._send(b"".join(self._pack(command) for command in commands))
        return await self._replies(len(commands))

    def drop(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            _close_now(stream)


# What a broken connection raises below our errors: each becomes a TransientError.
CONNECTION_FAULTS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                     hiredis.ProtocolError, trio.TooSlowError)


class BlockingReader:
    """One connection, on Trio's own sockets, waiting in XREAD BLOCK on many streams
    (`read`; `unblock`, from a thread, wakes it through the control connection), or
    reading without BLOCK the streams a relay was told grew (`read_now`).

    Why not redis-py here: its client is synchronous, so each read ran in a thread,
    and at a thousand open streams the hand-over between that thread and the event
    loop (the GIL's 5 ms switch interval included) cost more than the read and put
    milliseconds on every event. The reply's shape is checked before it is used: a
    broken or hostile reply is an error, not a crash.
    """

    def __init__(self, locate: Callable[[], Mapping[str, Any]], control: Any, *,
                 primary_only: bool = False, connect_timeout_s: float = 5.0,
                 reply_timeout_s: float = 10.0) -> None:
        """`locate` (blocking) says where to connect, asked again before each connection;
        with `primary_only` (Sentinel), a server that is not the primary is refused: the
        sentinels may not have caught up with a failover yet."""
        self._locate = locate
        self._primary_only = primary_only
        self._conn = RespConnection({}, connect_timeout_s)
        self._control = control
        self._reply_timeout_s = reply_timeout_s  # beyond the XREAD's own BLOCK time
        self._id: int | None = None

    async def _connect(self) -> None:
        try:
            self._conn.target = dict(await trio.to_thread.run_sync(self._locate))
        except redis.RedisError as exc:
            raise translate(exc) from exc
        await self._conn.connect()
        if self._primary_only:
            role = await self._conn.call("ROLE")
            if not (isinstance(role, list) and role and role[0] == "master"):
                where = f"{self._conn.target.get('host')}:{self._conn.target.get('port')}"
                raise TransientError(f"redis: {where} is not the primary (ROLE {str(role)[:80]})",
                                     kind="server_state")
        client_id = await self._conn.call("CLIENT", "ID")
        if not isinstance(client_id, int):
            raise PermanentError(f"redis: CLIENT ID replied {type(client_id).__name__}, "
                                 "not an integer", code="redis")
        self._id = client_id

    async def read(self, streams: Mapping[str, str], count: int,
                   block_ms: int) -> list[tuple[str, list[Entry]]]:
        """Entries after each stream's id, or [] once `block_ms` passed (or `unblock`)."""
        return await self._xread(streams, count, ["BLOCK", str(block_ms)], block_ms / 1000)

    async def read_now(self, streams: Mapping[str, str],
                       count: int) -> list[tuple[str, list[Entry]]]:
        """Entries after each stream's id that are there now (no BLOCK): the read of a
        relay told by keyspace notifications which streams grew."""
        return await self._xread(streams, count, [], 0.0)

    async def _xread(self, streams: Mapping[str, str], count: int, block: list[str],
                     block_s: float) -> list[tuple[str, list[Entry]]]:
        args = ["XREAD", "COUNT", str(count), *block, "STREAMS",
                *streams.keys(), *streams.values()]
        try:
            if not self._conn.connected:
                await self._connect()
            with trio.fail_after(block_s + self._reply_timeout_s):
                (reply,) = await self._conn.pipeline([args])
            if isinstance(reply, hiredis.ReplyError):
                with trio.fail_after(self._reply_timeout_s):
                    return await self._read_alone(streams, count, reply)
            return xread_reply(reply)
        except CONNECTION_FAULTS as exc:
            self._drop()
            raise TransientError(f"redis: reading streams: {type(exc).__name__}: {exc}",
                                 kind="connection") from exc
        except StreamsRefused:
            raise  # every reply was read: the connection is fine
        except BaseException:
            self._drop()  # an error reply, a bad shape, or cancelled mid-reply
            raise

    async def _read_alone(self, streams: Mapping[str, str], count: int,
                          failure: hiredis.ReplyError) -> list[tuple[str, list[Entry]]]:
        """The XREAD over every stream got an error reply, and one stream can fail it for
        all (its key holds another type, Redis refuses its position). Which: each stream
        is read alone, without BLOCK, pipelined (one round trip). Those refused alone
        (see `streams_at_fault`) are raised as StreamsRefused with what the others read.
        An error about the server's state (LOADING, READONLY...) is raised for all, as is
        the first error when no stream is at fault and nothing was found (no busy loop
        on it)."""
        error = translate(redis.ResponseError(str(failure)))
        if isinstance(error, TransientError):
            raise error
        replies = await self._conn.pipeline(
            [["XREAD", "COUNT", str(count), "STREAMS", key, after]
             for key, after in streams.items()])
        refused: dict[str, str] = {}
        found: list[tuple[str, list[Entry]]] = []
        for key, reply in zip(streams, replies, strict=True):
            if isinstance(reply, hiredis.ReplyError):
                refused[key] = stream_refusal(redis.ResponseError(str(reply)))
            else:
                found += xread_reply(reply)
        if streams_at_fault(refused, len(streams)):
            raise StreamsRefused(refused, found)
        if refused or not found:
            raise error
        return found

    def unblock(self) -> None:
        """Wake a blocked `read` (it returns [] at once); nothing if none is blocked.
        Blocking: run it in a thread."""
        if self._id is not None:
            try:
                self._control.client_unblock(self._id)
            except redis.RedisError:
                pass  # the read times out on its own instead

    def _drop(self) -> None:
        self._id = None
        self._conn.drop()

    def close(self) -> None:
        self._drop()


def _close_now(stream: trio.abc.Stream) -> None:
    """Close at once, without awaiting (a TLS close_notify is not sent)."""
    transport: Any = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    with contextlib.suppress(Exception):
        transport.socket.close()


# Error replies about the stream named itself, never about the server: its key holds
# another type, or its position is not an id Redis takes (redis-py drops the "ERR ").
_STREAM_FAULT = re.compile(r"(WRONGTYPE|(ERR )?Invalid stream ID)\b")


def stream_refusal(error: redis.RedisError) -> str:
    """Why one stream's own XREAD failed, when the error reply may be about that stream;
    an error about the connection or the server's state (LOADING, READONLY...) is
    raised instead, for the whole read."""
    translated = translate(error)
    if isinstance(error, redis.ResponseError) and isinstance(translated, PermanentError):
        return str(error)
    raise translated from error


def streams_at_fault(refused: Mapping[str, str], asked: int) -> bool:
    """Whether the streams whose XREAD alone got an error reply (`refused`, of `asked`
    read alone) are at fault themselves: each error is about its stream's key or
    position, or other streams read in the same round got none. When every stream fails
    alike for another reason (a lost permission, a broken server), no stream is to
    blame and the read is retried for all."""
    return bool(refused) and (len(refused) < asked or all(
        _STREAM_FAULT.match(reason) for reason in refused.values()))


def xread_reply(reply: Any) -> list[tuple[str, list[Entry]]]:
    """XREAD's RESP2 reply ([[key, [[id, [field, value, ...]], ...]], ...] or nil) as
    (key, entries); any other shape is a PermanentError naming what was wrong.

    Every relayed event passes here, so the checks are the cheapest that say as much:
    `x.__class__ is list` (exactly a list, as hiredis builds them; it also keeps the
    type checker from narrowing `Any` to a list of unknowns, which `type(x) is list`
    would, so no `cast` call is paid per item), and one C call that fails on any field
    that is not a string."""
    if reply is None:
        return []
    if reply.__class__ is not list:
        raise _shape(f"the reply is {type(reply).__name__}, not an array")
    found: list[tuple[str, list[Entry]]] = []
    for item in reply:
        if not (item.__class__ is list and len(item) == 2 and item[0].__class__ is str
                and item[1].__class__ is list):
            raise _shape("a stream is not [key, entries]")
        key: str = item[0]
        entries: list[Entry] = []
        for entry in item[1]:
            if not (entry.__class__ is list and len(entry) == 2
                    and entry[0].__class__ is str and is_entry_id(entry[0])):
                raise _shape(f"an entry of {key!r} is not [id, fields]")
            fields = entry[1]
            if fields is None:  # a deleted entry: no fields
                entries.append((entry[0], {}))
                continue
            if fields.__class__ is not list or len(fields) % 2:
                raise _shape(f"entry {entry[0]} of {key!r} has no field/value pairs")
            try:
                "".join(fields)  # every one a string (C's check, not one isinstance each)
            except TypeError:
                raise _shape(f"entry {entry[0]} of {key!r} has no field/value pairs") from None
            pairs = iter(fields)
            entries.append((entry[0], dict(zip(pairs, pairs, strict=True))))
        found.append((key, entries))
    return found


def _ranged(key: str, reply: Any) -> list[Entry]:
    """What redis-py's XRANGE or XREVRANGE of `key` returned, checked as an XREAD's
    reply is: a broken or hostile reply is a PermanentError naming what was wrong,
    never a crash of the response that asked."""
    if reply.__class__ is not list:
        raise _shape(f"the reply is {type(reply).__name__}, not an array", "XRANGE")
    entries: list[Entry] = []
    for entry in reply:
        if not (entry.__class__ in (tuple, list) and len(entry) == 2
                and entry[0].__class__ is str and is_entry_id(entry[0])):
            raise _shape(f"an entry of {key!r} is not [id, fields]", "XRANGE")
        fields = {} if entry[1] is None else entry[1]  # a deleted entry: no fields
        if not (fields.__class__ is dict and all(
                name.__class__ is str and value.__class__ is str
                for name, value in fields.items())):
            raise _shape(f"entry {entry[0]} of {key!r} has no field/value pairs", "XRANGE")
        entries.append((entry[0], fields))
    return entries


def _shape(what: str, command: str = "XREAD") -> PermanentError:
    return PermanentError(f"redis: {command} replied in an unknown shape: {what}",
                          code="redis")
