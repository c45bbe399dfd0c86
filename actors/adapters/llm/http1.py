"""Just enough HTTP/1.1 for a streaming POST, on Trio sockets, with keep-alive.

Why not httpx here: for a streamed answer httpx (through httpcore and h11)
runs a state machine per HTTP chunk and walks its connection pool on every
request; at a thousand streams that was most of the worker's CPU. This client
does one thing: POST a body, read the status and headers, then hand back the
de-chunked body one network read at a time, so a read that carries fifty SSE
events costs one pass of bytes.find, not fifty. Connections are reused per
origin when the body was read to its end. TLS is the standard library's, with
the CA bundle httpx would pick. Proxies are not spoken: openai_wire sends
requests that must go through a proxy to LiteLLM instead.

Strict and bounded, because the other side may be broken or hostile: the
grammar is RFC 9112's as h11 reads it, every size has a limit, every loop
either awaits or does work linear in the bytes it was given, and every fault
in the server's bytes is a ProtocolError (or ConnectionLost), never another
exception type.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio

MAX_HEAD = 64 * 1024  # one response head: status line and headers
MAX_HEADERS = 128  # header lines in a head, and trailer lines after a chunked body
MAX_TRAILER = 16 * 1024
MAX_CHUNK_LINE = 1024  # a chunk-size line with its extensions
MAX_INFORMATIONAL = 8  # 1xx heads skipped before the final one
READ_SIZE = 64 * 1024

# RFC 9110/9112 grammar, as h11 reads it (tests/test_http1_differential.py holds us to
# refusing everything h11 refuses); matched on bytes, so `\s` is [ \t\n\r\f\v] only.
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9]{2})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_FIELD = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?[ \t]*")
_DIGITS = re.compile(r"[0-9]{1,18}")


class ProtocolError(Exception):
    """The server's bytes are not HTTP/1.1 as we speak it (transient: retried like a
    dropped stream)."""


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


# --- parsing, without I/O ------------------------------------------------------------

def _fields(lines: list[bytes], what: str) -> tuple[dict[str, str], dict[str, int]]:
    """Header (or trailer) lines -> {lower name: value, repeats joined by ', '} and how
    many times each name came."""
    if len(lines) > MAX_HEADERS:
        raise ProtocolError(f"more than {MAX_HEADERS} {what} lines")
    fields: dict[str, str] = {}
    counts: dict[str, int] = {}
    for line in lines:
        match = _FIELD.fullmatch(line)
        if match is None:
            raise ProtocolError(f"bad {what} line {line[:80]!r}")
        name = match.group(1).decode("ascii").lower()
        value = match.group(2).decode("latin-1")
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
        counts[name] = counts.get(name, 0) + 1
    return fields, counts


def _tokens(value: str) -> list[str]:
    return [token.strip().lower() for token in value.split(",") if token.strip()]


@dataclass(frozen=True)
class Head:
    status: int
    reason: str
    headers: dict[str, str]
    keep_alive: bool  # HTTP/1.1 without `Connection: close`
    body: BodyReader


def _head(raw: bytes) -> Head | None:
    """One response head (without its blank line); None for a 1xx to skip."""
    status_line, *lines = raw.split(b"\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise ProtocolError(f"bad status line {status_line[:80]!r}")
    minor, code, reason = match.groups()
    status = int(code)
    headers, counts = _fields(lines, "header")
    transfer = headers.get("transfer-encoding")
    length = headers.get("content-length")
    if transfer is not None and (counts["transfer-encoding"] > 1
                                 or _tokens(transfer) != ["chunked"]):
        raise ProtocolError(f"transfer-encoding {transfer!r}: only one 'chunked' is spoken")
    if length is not None and (counts["content-length"] > 1 or not _DIGITS.fullmatch(length)):
        raise ProtocolError(f"content-length {length!r}: exactly one, of digits, is spoken")
    if transfer is not None and length is not None:
        raise ProtocolError("both transfer-encoding and content-length: conflicting framing")
    if status < 200:
        if status == 101:
            raise ProtocolError("101 Switching Protocols was not asked for")
        return None
    encoding = headers.get("content-encoding")
    if encoding is not None and _tokens(encoding) not in ([], ["identity"]):
        raise ProtocolError(f"content-encoding {encoding!r} was not asked for")
    body: BodyReader
    if transfer is not None:
        body = ChunkedDecoder()
    elif length is not None:
        body = FixedLength(int(length))
    else:
        body = UntilClose()
    if status in (204, 304):
        body = FixedLength(0)  # never a body, whatever the headers say
    keep_alive = minor == b"1" and "close" not in _tokens(headers.get("connection", ""))
    return Head(status, (reason or b"").decode("latin-1"), headers,
                keep_alive and not isinstance(body, UntilClose), body)


class HeadParser:
    """Takes the final response head from the front of a buffer, skipping 1xx heads.
    Scans each byte once however the head arrives (a server dripping one byte per read
    costs linear time), within MAX_HEAD."""

    def __init__(self) -> None:
        self._scanned = 0
        self._informational = 0

    def take(self, buffer: bytearray) -> Head | None:
        """The final head, removed from `buffer` with its blank line; None: read more."""
        while True:
            end = buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
            if end < 0:
                self._scanned = len(buffer)
                if len(buffer) > MAX_HEAD:
                    raise ProtocolError(f"response head larger than {MAX_HEAD} bytes")
                return None
            if end > MAX_HEAD:
                raise ProtocolError(f"response head larger than {MAX_HEAD} bytes")
            raw = bytes(buffer[:end])
            del buffer[:end + 4]
            self._scanned = 0
            head = _head(raw)
            if head is not None:
                return head
            self._informational += 1
            if self._informational > MAX_INFORMATIONAL:
                raise ProtocolError(f"more than {MAX_INFORMATIONAL} 1xx responses")


class ChunkedDecoder:
    """Incremental `Transfer-Encoding: chunked` decoder: bytes in, payload bytes out.
    Each call does work linear in what it was given; what is held back is bounded."""

    def __init__(self) -> None:
        self._pending = b""
        self._left = 0  # payload bytes still to come in the current chunk
        self._state = "size"  # size -> data -> crlf -> size ... -> trailer -> done
        self._trailer_lines = 0
        self._trailer_bytes = 0
        self.done = False
        self.leftover = b""  # bytes after the body (not ours to read)

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
                end = buf.find(b"\r\n", pos, pos + MAX_CHUNK_LINE + 2)
                if end < 0:
                    if len(buf) - pos > MAX_CHUNK_LINE:
                        raise ProtocolError("chunk size line too long")
                    break
                match = _CHUNK_SIZE.fullmatch(buf, pos, end)
                if match is None:
                    raise ProtocolError(f"bad chunk size line {buf[pos:end][:40]!r}")
                size = int(match.group(1), 16)
                pos = end + 2
                if size:
                    self._left = size
                    self._state = "data"
                    continue
                self._state = "trailer"
            if self._state == "trailer":
                pos = self._trailer(buf, pos)
                if not self.done:
                    break
        self._pending = buf[pos:]
        if self.done:
            self.leftover, self._pending = self._pending, b""
        return b"".join(out)

    def _trailer(self, buf: bytes, pos: int) -> int:
        """Check trailer lines (skipped) up to the blank line; return where it stopped."""
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if self._trailer_bytes + len(buf) - pos > MAX_TRAILER:
                    raise ProtocolError(f"trailer larger than {MAX_TRAILER} bytes")
                return pos
            line = buf[pos:end]
            pos = end + 2
            if not line:  # the blank line after the (usually absent) trailers
                self.done = True
                return pos
            self._trailer_lines += 1
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > MAX_TRAILER:
                raise ProtocolError(f"trailer larger than {MAX_TRAILER} bytes")
            _fields([line], "trailer")
            if self._trailer_lines > MAX_HEADERS:
                raise ProtocolError(f"more than {MAX_HEADERS} trailer lines")

    def eof(self) -> None:
        if not self.done:
            raise ConnectionLost("the server closed the connection mid-body")


class FixedLength:
    """A `Content-Length` body."""

    def __init__(self, length: int) -> None:
        self._left = length
        self.done = length == 0
        self.leftover = b""

    def feed(self, data: bytes) -> bytes:
        payload, self.leftover = data[:self._left], data[self._left:]
        self._left -= len(payload)
        self.done = self._left == 0
        return payload

    def eof(self) -> None:
        if not self.done:
            raise ConnectionLost("the server closed the connection mid-body")


class UntilClose:
    """A body delimited by the end of the connection (never kept alive)."""

    done = False
    leftover = b""

    def feed(self, data: bytes) -> bytes:
        return data

    def eof(self) -> None:
        self.done = True


BodyReader = ChunkedDecoder | FixedLength | UntilClose


# --- I/O ---------------------------------------------------------------------------

@dataclass(eq=False)
class _Connection:
    stream: trio.abc.Stream
    buffer: bytearray = field(default_factory=bytearray)
    reused: bool = False
    idle_since: float = 0.0

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


class Response:
    def __init__(self, connection: _Connection, head: Head) -> None:
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers
        self.keep_alive = head.keep_alive
        self._connection = connection
        self._body = head.body
        self.complete = False  # the whole body was read: the connection may be reused

    async def pieces(self) -> AsyncGenerator[bytes]:
        """The body, de-chunked, one network read at a time."""
        connection, body = self._connection, self._body
        while not body.done:
            if connection.buffer:
                data = bytes(connection.buffer)
                connection.buffer.clear()
                payload = body.feed(data)
                if payload:
                    yield payload
            elif not await connection.fill():
                body.eof()  # ConnectionLost unless the close was the body's end
        connection.buffer += body.leftover
        self.complete = True

    async def read(self, limit: int) -> bytes:
        """The whole body, cut at `limit` bytes (for error answers)."""
        body = bytearray()
        async for piece in self.pieces():
            body += piece
            if len(body) >= limit:
                break
        return bytes(body[:limit])


async def read_head(connection: _Connection) -> Head:
    """Read until the final response head; the body stays in the connection's buffer."""
    parser = HeadParser()
    while (head := parser.take(connection.buffer)) is None:
        if not await connection.fill():
            raise ConnectionLost("the server closed the connection before answering")
    return head


async def _send_and_read_head(connection: _Connection, request: bytes) -> Head:
    try:
        await connection.stream.send_all(request)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise ConnectionLost(f"{type(exc).__name__}: {exc}") from exc
    return await read_head(connection)


Resend = Callable[[str], Awaitable[bool]]


def default_tls() -> ssl.SSLContext:
    """The CA bundle as httpx picks it: SSL_CERT_FILE, else SSL_CERT_DIR, else certifi's
    (the bundle the vendors' SDKs use). A private CA is named the same way for both paths."""
    cafile = os.environ.get("SSL_CERT_FILE")
    if cafile:
        return ssl.create_default_context(cafile=cafile)
    capath = os.environ.get("SSL_CERT_DIR")
    if capath:
        return ssl.create_default_context(capath=capath)
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def _keepalive(stream: trio.SocketStream) -> None:
    """TCP keepalive: a vendor's side that vanished (a NAT or load balancer dropping the
    flow) is found in about a minute and a half instead of never."""
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):  # Linux; macOS has TCP_KEEPALIVE instead
            stream.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class Client:
    """Keep-alive connections per origin; `stream_post` is the only request it makes.

    An idle connection is closed after `idle_expiry_s` (below the 5 s that uvicorn and
    others keep one, so we rarely reuse one the server is closing). A POST is sent
    again on a fresh connection only when the kept-alive one failed before any byte
    came back, and only if the caller's `resend` agrees: the first may have reached
    the vendor, so it counts as a retry and must fit the job's budget."""

    def __init__(self, *, connect_timeout_s: float = 10.0, keepalive_per_origin: int = 256,
                 idle_expiry_s: float = 4.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._keepalive = keepalive_per_origin
        self._idle_expiry_s = idle_expiry_s
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = default_tls()
        return self._ssl

    async def _connect(self, origin: Origin) -> _Connection:
        """A new connection; raises OSError, ConnectionLost, or the certificate refusal
        (ssl.SSLCertVerificationError: not worth retrying)."""
        connection: _Connection | None = None
        try:
            with trio.move_on_after(self._connect_timeout_s):
                tcp = await trio.open_tcp_stream(origin.host, origin.port)
                connection = _Connection(tcp)
                _keepalive(tcp)
                if origin.scheme == "https":
                    connection.stream = tls = trio.SSLStream(
                        tcp, self._tls(), server_hostname=origin.host, https_compatible=True)
                    await tls.do_handshake()
                opened, connection = connection, None
                return opened
        except trio.BrokenResourceError as exc:
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                raise exc.__cause__ from None
            raise ConnectionLost(f"TLS handshake with {origin.host} failed: "
                                 f"{exc.__cause__ or exc}") from exc
        finally:
            if connection is not None:  # not handed out (a refusal, a timeout, a cancel)
                await connection.aclose()
        raise ConnectionLost(f"no connection to {origin.host}:{origin.port} within "
                             f"{self._connect_timeout_s:g} s")

    async def _checkout(self, origin: Origin) -> _Connection:
        idle = self._idle.get(origin)
        now = trio.current_time()
        while idle:
            connection = idle.pop()
            if now - connection.idle_since > self._idle_expiry_s:
                await connection.aclose()
                continue
            connection.reused = True
            return connection
        return await self._connect(origin)

    def _checkin(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) < self._keepalive and not connection.buffer:
            connection.reused = False
            connection.idle_since = trio.current_time()
            idle.append(connection)

    async def _exchange(self, origin: Origin, request: bytes,
                        resend: Resend | None) -> tuple[_Connection, Response]:
        """Send the request and read the head; see the class for when it is sent again."""
        while True:
            connection = await self._checkout(origin)
            try:
                head = await _send_and_read_head(connection, request)
            except ConnectionLost as exc:
                await connection.aclose()
                if (connection.reused and not connection.buffer and resend is not None
                        and await resend(f"kept-alive connection lost ({exc}); sent again")):
                    continue  # on a fresh connection: `reused` is False there, so once
                raise
            except BaseException:
                await connection.aclose()
                raise
            return connection, Response(connection, head)

    @asynccontextmanager
    async def stream_post(self, url: str, headers: dict[str, str], body: bytes, *,
                          resend: Resend | None = None) -> AsyncIterator[Response]:
        origin, target = Origin.of(url)
        if any("\r" in v or "\n" in v for v in (*headers, *headers.values())):
            raise ValueError("a header name or value contains a line break")
        lines = [f"POST {target} HTTP/1.1", f"host: {origin.host_header}",
                 f"content-length: {len(body)}", "accept-encoding: identity",
                 *(f"{name}: {value}" for name, value in headers.items())]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        connection, response = await self._exchange(origin, request, resend)
        try:
            yield response
        finally:
            if response.complete and response.keep_alive:
                self._checkin(origin, connection)
            else:
                await connection.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await connection.aclose()
