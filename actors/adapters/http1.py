"""Just enough HTTP/1.1 for a streaming POST, on Trio sockets, with keep-alive.

Why not httpx here: for a streamed answer httpx (through httpcore and h11)
runs a state machine per HTTP chunk and walks its connection pool on every
request; at a thousand streams that was most of the worker's CPU. This client
does one thing: POST a body, read the status and headers, then hand back the
de-chunked body one network read at a time, so a read that carries fifty SSE
events costs one pass of bytes.find, not fifty. Connections are reused per
origin when the body was read to its end. TLS is the standard library's, with
certifi's CA bundle as httpx uses. Proxies are not spoken: openai_wire sends
requests that must go through a proxy to LiteLLM instead.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio

MAX_HEAD = 64 * 1024
READ_SIZE = 64 * 1024


class ProtocolError(Exception):
    """The server's bytes are not HTTP/1.1 as we speak it."""


class ConnectionLost(Exception):
    """The connection closed or broke before the response was complete."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> tuple[Origin, str]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, parts.hostname, port), target

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(eq=False)
class _Connection:
    stream: trio.abc.Stream
    buffer: bytearray = field(default_factory=bytearray)
    reused: bool = False

    async def fill(self) -> bool:
        """Read once more into the buffer; False at end of stream."""
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(f"{type(exc).__name__}: {exc}") from exc
        if not data:
            return False
        self.buffer += data
        return True

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self.stream.aclose()


class ChunkedDecoder:
    """Incremental `Transfer-Encoding: chunked` decoder: bytes in, payload bytes out."""

    def __init__(self) -> None:
        self._pending = b""
        self._left = 0  # payload bytes still to come in the current chunk
        self._state = "size"  # size -> data -> crlf -> size ... -> trailer -> done
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf = self._pending + data if self._pending else data
        out: list[bytes] = []
        pos = 0
        while not self.done:
            if self._state == "data":
                take = min(self._left, len(buf) - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                if self._left:
                    break
                self._state = "crlf"
            if self._state == "crlf":
                if len(buf) - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ProtocolError("chunk not followed by CRLF")
                pos += 2
                self._state = "size"
            if self._state == "size":
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if len(buf) - pos > 1024:
                        raise ProtocolError("chunk size line too long")
                    break
                try:
                    size = int(buf[pos:end].split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {buf[pos:end][:40]!r}") from None
                pos = end + 2
                if size:
                    self._left = size
                    self._state = "data"
                    continue
                self._state = "trailer"
            if self._state == "trailer":
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                line, pos = buf[pos:end], end + 2
                if not line:  # the blank line after the (usually absent) trailers
                    self.done = True
        self._pending = buf[pos:]
        return b"".join(out)


class Response:
    def __init__(self, connection: _Connection, status: int, reason: str,
                 headers: dict[str, str]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._connection = connection
        self.complete = False  # the whole body was read: the connection may be reused
        encoding = headers.get("transfer-encoding", "").lower()
        self._chunked = ChunkedDecoder() if "chunked" in encoding else None
        length = headers.get("content-length")
        self._left = int(length) if length is not None and self._chunked is None else None

    async def pieces(self) -> AsyncGenerator[bytes]:
        """The body, de-chunked, one network read at a time."""
        connection = self._connection
        while True:
            if connection.buffer:
                data = bytes(connection.buffer)
                connection.buffer.clear()
                if self._chunked is not None:
                    payload = self._chunked.feed(data)
                    if self._chunked.done:
                        self.complete = True
                elif self._left is not None:
                    payload, extra = data[:self._left], data[self._left:]
                    connection.buffer += extra
                    self._left -= len(payload)
                    self.complete = self._left == 0
                else:
                    payload = data
                if payload:
                    yield payload
                if self.complete:
                    return
            if self._left == 0:
                self.complete = True
                return
            if not await connection.fill():
                if self._chunked is None and self._left is None:
                    return  # delimited by close: that was the end
                raise ConnectionLost("the server closed the connection mid-body")

    async def read(self, limit: int) -> bytes:
        """The whole body, cut at `limit` bytes (for error answers)."""
        body = bytearray()
        async for piece in self.pieces():
            body += piece
            if len(body) >= limit:
                break
        return bytes(body[:limit])


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ProtocolError(f"bad status line {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"bad header line {line[:80]!r}")
        name = name.strip().lower()
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    return int(code), reason, headers


async def _send_and_read_head(connection: _Connection,
                              request: bytes) -> tuple[int, str, dict[str, str]]:
    try:
        await connection.stream.send_all(request)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise ConnectionLost(f"{type(exc).__name__}: {exc}") from exc
    while (end := connection.buffer.find(b"\r\n\r\n")) < 0:
        if len(connection.buffer) > MAX_HEAD:
            raise ProtocolError("response head too large")
        if not await connection.fill():
            raise ConnectionLost("the server closed the connection before answering")
    head = bytes(connection.buffer[:end])
    del connection.buffer[:end + 4]
    return _parse_head(head)


class Client:
    """Keep-alive connections per origin; `stream_post` is the only request it makes."""

    def __init__(self, *, connect_timeout_s: float = 10.0, keepalive_per_origin: int = 256,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._keepalive = keepalive_per_origin
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            import certifi  # the CA bundle httpx and the vendors' SDKs use

            self._ssl = ssl.create_default_context(cafile=certifi.where())
        return self._ssl

    async def _connect(self, origin: Origin) -> _Connection:
        with trio.fail_after(self._connect_timeout_s):
            stream: trio.abc.Stream = await trio.open_tcp_stream(origin.host, origin.port)
            if origin.scheme == "https":
                stream = trio.SSLStream(stream, self._tls(), server_hostname=origin.host,
                                        https_compatible=True)
                await stream.do_handshake()
        return _Connection(stream)

    async def _checkout(self, origin: Origin) -> _Connection:
        idle = self._idle.get(origin)
        if idle:
            connection = idle.pop()
            connection.reused = True
            return connection
        return await self._connect(origin)

    def _checkin(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) < self._keepalive and not connection.buffer:
            connection.reused = False
            idle.append(connection)

    async def _exchange(self, origin: Origin, request: bytes) -> tuple[_Connection, Response]:
        """Send the request and read the head; a stale kept-alive connection is retried
        once on a fresh one (it failed before the server read anything)."""
        while True:
            connection = await self._checkout(origin)
            try:
                head = await _send_and_read_head(connection, request)
            except ConnectionLost:
                await connection.aclose()
                if connection.reused and not connection.buffer:
                    continue
                raise
            except BaseException:
                await connection.aclose()
                raise
            return connection, Response(connection, *head)

    @asynccontextmanager
    async def stream_post(self, url: str, headers: dict[str, str],
                          body: bytes) -> AsyncIterator[Response]:
        origin, target = Origin.of(url)
        if any("\r" in v or "\n" in v for v in (*headers, *headers.values())):
            raise ValueError("a header name or value contains a line break")
        lines = [f"POST {target} HTTP/1.1", f"host: {origin.host_header}",
                 f"content-length: {len(body)}", "accept-encoding: identity",
                 *(f"{name}: {value}" for name, value in headers.items())]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        connection, response = await self._exchange(origin, request)
        try:
            yield response
        finally:
            if response.complete and response.headers.get("connection", "").lower() != "close":
                self._checkin(origin, connection)
            else:
                await connection.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await connection.aclose()
