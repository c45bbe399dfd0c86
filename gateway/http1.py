"""http1: the gateway's HTTP/1.1 server, Trio sockets under its ASGI app.

h11 speaks the protocol: request heads and bodies, chunked framing, keep-alive,
`Expect: 100-continue`, HTTP/1.0 clients. This module moves the bytes and runs the
app once per request. A response's bytes go to the socket as the app sends them,
written with one non-blocking `send`: when the kernel takes them at once (it nearly
always does) a write costs a few µs and no trip through Trio's scheduler; only a
full socket buffer (a slow client) waits until the socket is writable again. An
event stream pays that for every write, so it is most of what the gateway's relay
costs per event (Hypercorn's ASGI path took about 100 µs a write, Trio's
`send_all` 15-35 µs). An event stream's body can also be written from another
task without waiting (`write_nowait`, under the scope extension DIRECT_WRITES):
the relay's reader writes each client's entries itself, and the response's own
task only flushes what the socket did not take.

Limits: a request head must arrive whole within `keep_alive_s` of the connection
opening or of the previous response (a client trickling its head is cut off), and
holds at most `max_head_bytes` (431). Bodies are the app's to bound (gateway.
max_body_bytes, body_timeout_s). On shutdown the listeners close, idle connections
close, and open requests get `graceful_s` to end before they are cancelled.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import h11
import trio

log = logging.getLogger("chat_actors.gateway.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
App = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
               Awaitable[None]]

RECEIVE_BYTES = 65536
# The scope extension under which a response body can be written without waiting,
# from any task (`_Connection.write_nowait`; the relay's event streams, GET's and
# POST /v1/chat/completions').
DIRECT_WRITES = "chat_actors.direct_writes"


class Written(enum.Enum):
    WRITTEN = "written"
    WAITING = "waiting"
    REFUSED = "refused"


# Closing with unread bytes makes the kernel reset the connection, and a client still
# sending (a body refused before it was read) loses the answer it was sent: the
# connection is closed for writing first, and what still comes is read and dropped
# for up to this long, this much.
LINGER_S = 2.0
LINGER_BYTES = 4 * 2**20


@dataclass(frozen=True)
class Limits:
    max_head_bytes: int = 16384  # a request line and headers, together
    keep_alive_s: float = 5.0  # for a request head to arrive whole
    graceful_s: float = 3.0  # for open requests to end on shutdown


class _Connection:
    """One client connection: its requests one after another, each through the app."""

    def __init__(self, stream: trio.SocketStream, server: _Server) -> None:
        self.stream = stream
        self.fd = stream.socket.fileno()
        self.server = server
        self.app = server.app
        self.limits = limits = server.limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        self.idle = True  # waiting for a request head: shutdown may close it at once
        self.eof = False
        self.closed = False  # a write failed: the client is gone
        self.scope: Scope | None = None  # the request being served
        self.head: bytes | None = None  # a response head not written yet
        self.responded = self.finished = False
        self.gone = trio.Event()
        # What a write left unsent (a full socket buffer), sent before anything else.
        self.pending = bytearray()
        self.chunked = False  # the response's body goes in chunks (HTTP/1.1, no length)

    async def serve(self) -> None:
        try:
            while await self._one_request() and not self.server.stopping:
                self.h11.start_next_cycle()
        finally:
            try:
                if not (self.eof or self.closed):
                    await self._linger()
            finally:
                self.gone.set()
                with trio.CancelScope(shield=True):
                    await self.stream.aclose()

    async def _linger(self) -> None:
        with trio.move_on_after(LINGER_S):
            try:
                await self.stream.send_eof()
                dropped = 0
                while dropped < LINGER_BYTES:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                    if not data:
                        return
                    dropped += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                return

    async def _one_request(self) -> bool:
        """Serve the next request; whether the connection may carry another."""
        self.idle = True
        request: h11.Request | None = None
        with trio.move_on_after(self.limits.keep_alive_s):
            request = await self._request()
        if request is None:
            return False  # no (whole) request in time, or none at all
        self.idle, self.responded, self.finished = False, False, False
        self.scope = _scope(request, self.stream)
        self.scope["extensions"][DIRECT_WRITES] = self
        try:
            await self.app(self.scope, self.receive, self.send)
        except Exception:
            log.exception("the app failed on %s %s", request.method.decode(errors="replace"),
                          request.target.decode(errors="replace"))
            if not self.responded:
                await self._refuse(500)
            return False
        if not self.responded:  # the app answered nothing
            await self._refuse(500)
            return False
        if not self.finished:  # the app returned mid-response: it cannot be ended well
            return False
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def _request(self) -> h11.Request | None:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc.error_status_hint, str(exc))
                return None
            if isinstance(event, h11.Request):
                if _head_bytes(event) > self.limits.max_head_bytes:
                    # h11 bounds only a head still incomplete: one that came whole in
                    # one read is measured here.
                    await self._refuse(431, "the request head is over "
                                            f"{self.limits.max_head_bytes} bytes")
                    return None
                return event
            if event is h11.NEED_DATA:
                if not await self._read():
                    return None
            else:  # ConnectionClosed, or PAUSED (a client that will not go on)
                return None

    async def _read(self) -> bool:
        """More bytes from the client into h11; False once it has closed."""
        try:
            data = await self.stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        self.h11.receive_data(data)
        self.eof = not data
        return bool(data)

    async def _refuse(self, status: int, why: str = "") -> None:
        """A plain error answer, and the connection closes after it."""
        body = (why or HTTPStatus(status).phrase).encode()
        try:
            head = self.h11.send(h11.Response(status_code=status, reason=_reason(status), headers=[
                ("content-type", "text/plain; charset=utf-8"),
                ("content-length", str(len(body))), ("connection", "close")]))
        except h11.LocalProtocolError:
            return  # the protocol state cannot take an answer: only closing is left
        await self._write((head or b"") + (self.h11.send(h11.Data(data=body)) or b"")
                          + (self.h11.send(h11.EndOfMessage()) or b""))

    async def receive(self) -> Message:
        """The app's ASGI receive: the body's pieces, then `http.disconnect` once the
        client has gone (a response that streams waits here to learn it)."""
        while True:
            if self.closed or self.eof:
                return {"type": "http.disconnect"}
            if self.h11.their_state is h11.DONE:
                await self._await_hang_up()
                continue
            if self.h11.they_are_waiting_for_100_continue:
                await self._write(self.h11.send(h11.InformationalResponse(
                    status_code=100, headers=[])) or b"")
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                self.eof = True  # a broken body: the app sees a disconnect
                continue
            if event is h11.NEED_DATA:
                await self._read()
            elif isinstance(event, h11.Data):
                return {"type": "http.request", "body": bytes(event.data), "more_body": True}
            elif isinstance(event, h11.EndOfMessage):
                return {"type": "http.request", "body": b"", "more_body": False}
            else:
                self.eof = True

    async def _await_hang_up(self) -> None:
        """The request is whole: read on only to see the client close. What a client
        sends meanwhile (its next request) waits in h11, up to the head limit; past
        it, nothing more is read."""
        if len(self.h11.trailing_data[0]) >= self.limits.max_head_bytes:
            await self.gone.wait()
            return
        await self._read()

    async def send(self, message: Message) -> None:
        """The app's ASGI send: the head waits for the first body bytes, and each
        body piece is written at once."""
        kind = message["type"]
        if kind == "http.response.start":
            self.responded = True
            status = message["status"]
            self.head = self.h11.send(h11.Response(
                status_code=status, headers=list(message.get("headers", ())),
                reason=_reason(status)))
            self.chunked = b"\r\ntransfer-encoding: chunked\r\n" in (self.head or b"").lower()
            return
        if kind != "http.response.body" or self.finished:
            return
        body = message.get("body", b"") if self.scope and self.scope["method"] != "HEAD" else b""
        data = self.head or b""
        self.head = None
        if body:
            data += self.h11.send(h11.Data(data=body)) or b""
        if not message.get("more_body", False):
            self.finished = True
            data += self.h11.send(h11.EndOfMessage()) or b""
        if data:
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        """All of `data` to the socket after what is pending, waiting only while its
        buffer is full. A client that has gone is noted (the app learns it from
        `receive`), not raised."""
        self.pending += data
        await self.flush()

    async def flush(self) -> None:
        """Send what is pending, waiting while the socket's buffer is full."""
        while self.pending and not self.closed:
            try:
                del self.pending[:os.write(self.fd, self.pending)]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.fd)
            except OSError:
                self.closed = True
        if self.closed:
            self.pending.clear()

    def write_nowait(self, body: bytes) -> Written:
        """A piece of the response body written now, from any task, without waiting:
        WRITTEN; WAITING when the socket took only part (the rest is pending: the
        response's own task must `flush`); REFUSED, nothing written, while anything is
        pending or the response has not started (its head goes first), has ended, or
        the client has gone."""
        if self.pending or self.head is not None or self.finished or self.closed \
                or not self.responded:
            return Written.REFUSED
        if not body or (self.scope is not None and self.scope["method"] == "HEAD"):
            return Written.WRITTEN  # nothing to write (a HEAD response has no body)
        # The body's framing, as h11 writes it for this response (its state is the
        # same either way: a chunk is a chunk), without its per-call cost.
        data = b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.closed = True
            return Written.REFUSED
        if sent == len(data):
            return Written.WRITTEN
        self.pending += memoryview(data)[sent:]
        return Written.WAITING


@functools.cache
def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _head_bytes(request: h11.Request) -> int:
    """About the size of the request line and headers as they came."""
    return (len(request.method) + len(request.target) + 12
            + sum(len(name) + len(value) + 4 for name, value in request.headers))


def _scope(request: h11.Request, stream: trio.SocketStream) -> Scope:
    target = request.target
    path, _, query = target.partition(b"?")
    client = stream.socket.getpeername()
    server = stream.socket.getsockname()
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": request.http_version.decode(), "method": request.method.decode(),
        "scheme": "http", "path": unquote(path.decode("ascii", "replace")), "raw_path": path,
        "query_string": query, "root_path": "", "headers": list(request.headers),
        "client": (client[0], client[1]), "server": (server[0], server[1]),
        "extensions": {}, "state": {},
    }


async def serve(app: App, *, host: str, port: int, limits: Limits,
                shutdown: Callable[[], Awaitable[None]],
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on host:port until `shutdown` returns; then stop taking connections,
    close the idle ones and give open requests `limits.graceful_s` to end. Reports its
    binds ("http://host:port") once listening."""
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    binds = [f"http://{host}:{listener.socket.getsockname()[1]}" for listener in listeners]
    server = _Server(app, limits)
    async with trio.open_nursery() as clients:
        async with trio.open_nursery() as accepting:
            accepting.start_soon(functools.partial(trio.serve_listeners, server.connection, listeners,
                                         handler_nursery=clients))
            task_status.started(binds)
            await shutdown()
            accepting.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        with trio.move_on_after(limits.graceful_s):
            await server.stop()
        clients.cancel_scope.cancel()


class _Server:
    """The open connections, so a shutdown can close the idle and wait for the rest."""

    def __init__(self, app: App, limits: Limits) -> None:
        self.app = app
        self.limits = limits
        self.open: set[_Connection] = set()
        self.stopping = False

    async def connection(self, stream: trio.SocketStream) -> None:
        connection = _Connection(stream, self)
        self.open.add(connection)
        try:
            await connection.serve()
        finally:
            self.open.discard(connection)

    async def stop(self) -> None:
        self.stopping = True
        while self.open:
            for connection in list(self.open):
                if connection.idle:
                    await connection.stream.aclose()  # its read ends: it closes
            if self.open:  # (closing one may have let every connection go meanwhile)
                await next(iter(self.open)).gone.wait()
