"""Differential fuzzing of the HTTP/1.1 response parser against h11.

Hypothesis builds valid responses (1xx heads, framing by chunks, length or close,
chunk extensions, trailers) and hostile mutations of them, and splits each at
arbitrary byte boundaries. On every valid response both parsers must agree on the
status, headers and body; ours must refuse every response h11 refuses (it may
refuse more: it is stricter about framing), and always in bounded time and memory.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass

import h11
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from actors.adapters.llm.http1 import (
    MAX_HEAD,
    ConnectionLost,
    ProtocolError,
    Response,
    _Connection,
    read_head,
)

REFUSED = "refused"
TOKEN = st.text(string.ascii_letters + string.digits + "-_!#$%&'*+.^`|~", min_size=1,
                max_size=12)
VALUE = st.text(string.ascii_letters + string.digits + " ;=,/:()-_.", max_size=30).map(str.strip)
FRAMING_NAMES = {"content-length", "transfer-encoding", "content-encoding", "connection"}


@dataclass(frozen=True)
class Parsed:
    status: int
    headers: dict[str, str]
    body: bytes

    def __post_init__(self) -> None:
        if "transfer-encoding" in self.headers:  # h11 gives its value in lower case
            self.headers["transfer-encoding"] = self.headers["transfer-encoding"].lower()


class Pieces(trio.abc.Stream):
    """A peer that sends `pieces` one per read, then closes."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = [p for p in pieces if p]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._pieces.pop(0) if self._pieces else b""

    async def send_all(self, data: bytes) -> None: ...
    async def wait_send_all_might_not_block(self) -> None: ...
    async def aclose(self) -> None: ...


def ours(pieces: list[bytes]) -> Parsed | str:
    async def parse() -> Parsed:
        connection = _Connection(Pieces(pieces))
        response = Response(connection, await read_head(connection))
        body = b"".join([piece async for piece in response.pieces()])
        return Parsed(response.status, response.headers, body)

    try:
        return trio.run(parse)
    except (ProtocolError, ConnectionLost):
        return REFUSED


def theirs(pieces: list[bytes]) -> Parsed | str:
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    connection.send(h11.Request(method="POST", target="/", headers=[("host", "x"),
                                                                    ("content-length", "0")]))
    connection.send(h11.EndOfMessage())
    status, headers, body = 0, {}, []
    try:
        for piece in [*(p for p in pieces if p), b""]:  # b"" tells h11 the peer closed
            connection.receive_data(piece)
            while (event := connection.next_event()) is not h11.NEED_DATA:
                match event:
                    case h11.Response():
                        status = event.status_code
                        for name, value in event.headers:
                            key, text = name.decode(), value.decode("latin-1")
                            headers[key] = f"{headers[key]}, {text}" if key in headers else text
                    case h11.Data():
                        body.append(bytes(event.data))
                    case h11.EndOfMessage():
                        return Parsed(status, headers, b"".join(body))
                    case h11.ConnectionClosed():
                        return REFUSED
    except h11.RemoteProtocolError:
        return REFUSED
    return REFUSED


def head(status: str, fields: list[tuple[str, str]]) -> bytes:
    return (status + "\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n").encode()


@st.composite
def responses(draw) -> bytes:
    """A valid response, as RFC 9112 writes it."""
    out = b""
    for code in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)):
        out += head(f"HTTP/1.1 {code} Info", draw(st.lists(st.tuples(TOKEN, VALUE), max_size=3)))
    version = draw(st.sampled_from(["1.1", "1.1", "1.0"]))
    code = draw(st.sampled_from([200, 200, 201, 204, 304, 400, 429, 500, 503]))
    reason = draw(st.text(string.ascii_letters + " ", max_size=12)).strip()
    fields = [(n, v) for n, v in draw(st.lists(st.tuples(TOKEN, VALUE), max_size=6))
              if n.lower() not in FRAMING_NAMES]
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["chunked", "length", "close"]))
    if draw(st.booleans()):
        fields.append(("Connection", draw(st.sampled_from(["close", "keep-alive", "Keep-Alive, TE"]))))
    if framing == "chunked":
        fields.append((draw(st.sampled_from(["Transfer-Encoding", "transfer-encoding"])),
                       draw(st.sampled_from(["chunked", "Chunked"]))))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=6)))
        payload = b""
        for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
            if end > start:
                size = draw(st.sampled_from(["%x", "%X", "00%x"])) % (end - start)
                ext = draw(st.sampled_from(["", ";a=1", ';name="v"', ";x"]))
                payload += f"{size}{ext}\r\n".encode() + body[start:end] + b"\r\n"
        trailers = draw(st.lists(st.tuples(TOKEN, VALUE), max_size=2))
        payload += b"0\r\n" + b"".join(f"{n}: {v}\r\n".encode() for n, v in trailers) + b"\r\n"
    elif framing == "length":
        fields.append(("Content-Length", str(len(body))))
        payload = body
    else:
        payload = body
    status = f"HTTP/{version} {code}" + (f" {reason}" if reason else "")
    return out + head(status, fields) + payload


HOSTILE = [
    b"1\r\na\r\n-6\r\n",  # a negative chunk size (it looped forever)
    b"5_0\r\n", b"+5\r\n", b" 5\r\n", b"0x5\r\n", b"5 ;x\r\n", b"ffffffffffffffffff\r\n",
]


@st.composite
def mutated(draw) -> bytes:
    raw = bytearray(draw(responses()))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "hostile", "header"]))
        at = draw(st.integers(0, len(raw)))
        if kind == "flip" and at < len(raw):
            raw[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            raw[at:at] = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b" ", b":", b"\x00", b"0",
                                               b"\xff", b"HTTP/1.1 100 Continue\r\n\r\n"]))
        elif kind == "delete":
            del raw[at:at + draw(st.integers(1, 8))]
        elif kind == "hostile":
            raw[at:at] = draw(st.sampled_from(HOSTILE))
        else:
            line = draw(st.sampled_from([
                b"Content-Length: 10, 10", b"Content-Length: 1e3", b"Content-Length: -1",
                b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: chunked",
                b"Content-Encoding: gzip", b" folded", b"Bad Name: x", b"X: a\x00b"]))
            end = raw.find(b"\r\n")
            if end >= 0:
                raw[end + 2:end + 2] = line + b"\r\n"
    return bytes(raw)


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts})
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]


# Bounded in the test command; `bin/chat-actors bench fuzz` runs many more.
FUZZ = settings(max_examples=int(os.environ.get("CHAT_ACTORS_FUZZ_EXAMPLES", "400")),
                deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(responses(), st.lists(st.integers(0, 10_000), max_size=8))
def test_on_every_valid_response_both_parsers_agree(raw, cuts):
    pieces = split(raw, cuts)
    expected = theirs(pieces)
    assert expected != REFUSED, raw  # the generator writes valid responses only
    assert ours(pieces) == expected


@FUZZ
@given(st.one_of(mutated(), st.binary(max_size=200)), st.lists(st.integers(0, 10_000), max_size=8))
@example(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n-6\r\n", [])
@example(b"HTTP/1.1 200 OK\r\ncontent-length: 10, 10\r\n\r\n0123456789", [])
def test_ours_refuses_every_response_h11_refuses(raw, cuts):
    pieces = split(raw, cuts)
    expected, got = theirs(pieces), ours(pieces)
    if expected == REFUSED:
        assert got == REFUSED, raw
    elif got != REFUSED:
        assert got == expected, raw


def test_every_byte_boundary_gives_the_same_answer():
    raw = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
           b"X-A: 1\r\n\r\n5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nT: 1\r\n\r\n")
    whole = ours([raw])
    assert whole == Parsed(200, {"transfer-encoding": "chunked", "x-a": "1"}, b"hello world")
    for at in range(len(raw) + 1):
        assert ours([raw[:at], raw[at:]]) == whole
    assert ours([bytes([b]) for b in raw]) == whole  # one byte per read
