"""The clients' HTTP/1.1 on Trio: h11 speaks the protocol, this file only moves bytes.

`call` is one request and its whole answer; `events` follows an SSE response and
hands each event to a callback with the time its bytes arrived. Both use a fresh
connection per request (loopback: a connect costs less than keeping count of them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import h11
import trio

HOST = "127.0.0.1"
RECEIVE = 65_536


class HttpFailed(Exception):
    """The connection failed or broke the protocol before a whole answer came."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict[str, str])
    body: bytes = b""


@dataclass(frozen=True)
class Event:
    id: str
    event: str
    data: str


class _Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def send(self, *events: h11.Request | h11.Data | h11.EndOfMessage) -> None:
        data = b"".join(self.h11.send(event) or b"" for event in events)
        await self.stream.send_all(data)

    async def next_event(self) -> object:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpFailed(f"the server broke HTTP: {exc}") from exc
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self.stream.receive_some(RECEIVE))

    async def response(self) -> Answer:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                return Answer(event.status_code, {k.decode(): v.decode(errors="replace")
                                                  for k, v in event.headers})
            if isinstance(event, h11.ConnectionClosed):
                raise HttpFailed("closed before an answer")


async def _connect(port: int) -> _Connection:
    try:
        return _Connection(await trio.open_tcp_stream(HOST, port))
    except OSError as exc:
        raise HttpFailed(f"connect: {exc}") from exc


def _request(method: str, target: str, headers: dict[str, str], length: int) -> h11.Request:
    fields = [("host", HOST), ("connection", "close"), *headers.items()]
    if method in ("POST", "PUT"):
        fields.append(("content-length", str(length)))
    return h11.Request(method=method, target=target, headers=fields)


async def call(port: int, method: str, target: str, headers: dict[str, str],
               body: bytes = b"") -> Answer:
    """One request and its whole answer (bound it with a Trio deadline)."""
    connection = await _connect(port)
    async with connection.stream:
        try:
            await connection.send(_request(method, target, headers, len(body)),
                                  *([h11.Data(data=body)] if body else []), h11.EndOfMessage())
            answer = await connection.response()
            parts: list[bytes] = []
            while not isinstance(event := await connection.next_event(),
                                 h11.EndOfMessage | h11.ConnectionClosed):
                if isinstance(event, h11.Data):
                    parts.append(bytes(event.data))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise HttpFailed(str(exc) or type(exc).__name__) from exc
    answer.body = b"".join(parts)
    return answer


async def events(port: int, target: str, headers: dict[str, str],
                 on_event: Callable[[Event, float], None],
                 on_open: Callable[[float], None] = lambda opened_ms: None) -> Answer:
    """GET an SSE response and call `on_event(event, arrived_ms)` for each event (wall
    clock milliseconds, comparable with a Redis entry id's) until the server ends it;
    `on_open(ms)` when the answer's head arrives. Returns the answer's status (its body
    too when it is not 200)."""
    connection = await _connect(port)
    async with connection.stream:
        try:
            await connection.send(_request("GET", target, headers, 0), h11.EndOfMessage())
            answer = await connection.response()
            on_open(time.time() * 1000)
            parser = SseParser()
            parts: list[bytes] = []
            while not isinstance(event := await connection.next_event(),
                                 h11.EndOfMessage | h11.ConnectionClosed):
                if not isinstance(event, h11.Data):
                    continue
                if answer.status != 200:
                    parts.append(bytes(event.data))
                    continue
                arrived_ms = time.time() * 1000
                for sse in parser.feed(bytes(event.data)):
                    on_event(sse, arrived_ms)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise HttpFailed(str(exc) or type(exc).__name__) from exc
    answer.body = b"".join(parts)
    return answer


class SseParser:
    """Server-Sent Events from chunks of bytes: blocks end at a blank line; blocks with
    an `id` or an `event` come out (a stream's entries, an `event: error`), comments and
    `retry:` do not."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Event]:
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        *blocks, self._buffer = self._buffer.split(b"\n\n")
        found: list[Event] = []
        for block in blocks:
            fields: dict[str, str] = {}
            for line in block.decode(errors="replace").split("\n"):
                name, _, value = line.partition(":")
                if name in ("id", "event", "data"):
                    fields[name] = value.removeprefix(" ")
            if "id" in fields or "event" in fields:
                found.append(Event(fields.get("id", ""), fields.get("event", "message"),
                                   fields.get("data", "")))
        return found
