"""The streaming HTTP/1.1 client: chunked decoding, keep-alive, stale connections."""

from __future__ import annotations

import socket
import ssl
from functools import partial

import pytest
import trio
import trustme
from hypothesis import given
from hypothesis import strategies as st

from actors.adapters.llm.http1 import (
    MAX_HEAD,
    MAX_HEADERS,
    MAX_TRAILER,
    ChunkedDecoder,
    Client,
    ConnectionLost,
    HeadParser,
    ProtocolError,
)


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@given(parts=st.lists(st.binary(min_size=1, max_size=300), max_size=20),
       cuts=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=10))
def test_chunked_decoding_is_independent_of_how_reads_split(parts, cuts):
    data = chunked(*parts)
    decoder = ChunkedDecoder()
    out, pos, i = [], 0, 0
    while pos < len(data):
        size = cuts[i % len(cuts)]
        out.append(decoder.feed(data[pos:pos + size]))
        pos, i = pos + size, i + 1
    assert b"".join(out) == b"".join(parts)
    assert decoder.done


def test_chunk_extensions_and_trailers_are_skipped():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"3;name=value\r\nabc\r\n0\r\nx-trailer: 1\r\n\r\n") == b"abc"
    assert decoder.done


@pytest.mark.parametrize("bad", [
    b"zz\r\nabc\r\n", b"3\r\nabcXY", b"9" * 2000,
    b"1\r\na\r\n-6\r\n",  # a negative size: it looped forever, with no checkpoint
    b"5_0\r\n", b"+5\r\n", b"0x5\r\n", b" 5\r\n", b"5 ;ext\r\n", b"1" * 17 + b"\r\n",
    b"0\r\nnot a trailer\r\n", b"0\r\n" + b"t: x\r\n" * 200,
    b"0\r\nt: " + b"x" * (MAX_TRAILER + 1),  # a trailer without end is bounded too
])
def test_malformed_chunking_is_a_protocol_error(bad):
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(bad)


@pytest.mark.parametrize(("head", "why"), [
    (b"SSH-2.0-OpenSSH_9.6", "bad status line"),
    (b"HTTP/1.1 2OO OK", "bad status line"),
    (b"HTTP/1.1 \xd9\xa2\xd9\xa0\xd9\xa0 OK", "bad status line"),  # non-ASCII digits
    (b"HTTP/2 200", "bad status line"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 10, 10", "exactly one, of digits"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\ncontent-length: 10", "exactly one, of digits"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: +10", "exactly one, of digits"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: xchunked", "only one 'chunked'"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked", "only one 'chunked'"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3", "conflicting"),
    (b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip", "was not asked for"),
    (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket", "was not asked for"),
    (b"HTTP/1.1 200 OK\r\n folded: value", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nx: a\x00b", "bad header line"),
    (b"HTTP/1.1 200 OK" + b"\r\nx: 1" * (MAX_HEADERS + 1), "more than"),
])
def test_a_malformed_head_is_a_protocol_error_naming_the_fault(head, why):
    with pytest.raises(ProtocolError, match=why):
        HeadParser().take(bytearray(head + b"\r\n\r\n"))


def test_an_endless_head_is_refused_at_its_limit_however_it_drips_in():
    parser, buffer = HeadParser(), bytearray(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(ProtocolError, match="larger than"):
        for _ in range(MAX_HEAD):  # a byte per read: each is scanned once
            buffer += b"x"
            assert parser.take(buffer) is None


def test_informational_heads_are_skipped_and_framing_is_read():
    buffer = bytearray(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nlink: x\r\n\r\n"
                       b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
    head = HeadParser().take(buffer)
    assert head is not None and head.status == 200 and not head.keep_alive  # HTTP/1.0
    assert head.body.feed(bytes(buffer)) == b"ok" and head.body.done
    for connection, keep in (("close", False), ("Keep-Alive, Close", False), ("keep-alive", True)):
        head = HeadParser().take(bytearray(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
                                           b"connection: %s\r\n\r\n" % connection.encode()))
        assert head is not None and head.keep_alive is keep


async def read_request(stream: trio.SocketStream, buffer: bytearray) -> bool:
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(4096)
        if not data:
            return False
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += await stream.receive_some(4096)
    buffer[:] = rest[length:]
    return True


OK = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked(b"hello ", b"world")


async def start(nursery: trio.Nursery, handler) -> tuple[str, list[int]]:
    connections: list[int] = []

    async def on_connection(stream: trio.SocketStream) -> None:
        connections.append(1)
        await handler(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/chat", connections


async def keep_alive(stream: trio.SocketStream) -> None:
    """A server that answers every request on a connection with OK."""
    buffer = bytearray()
    while await read_request(stream, buffer):
        await stream.send_all(OK)


async def body_of(client: Client, url: str, resend=None) -> bytes:
    async with client.stream_post(url, {"content-type": "application/json"}, b"{}",
                                  resend=resend) as response:
        assert response.status == 200
        return b"".join([piece async for piece in response.pieces()])


async def test_a_finished_response_leaves_its_connection_for_the_next_request():
    async with trio.open_nursery() as nursery:
        url, connections = await start(nursery, keep_alive)
        client = Client()
        assert [await body_of(client, url) for _ in range(3)] == [b"hello world"] * 3
        assert len(connections) == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("allowed", [True, False])
async def test_a_post_is_sent_again_on_a_lost_kept_alive_connection_only_if_allowed(allowed):
    # The first may have reached the vendor: the caller counts it as a retry and checks
    # its budget before saying yes.
    closed = trio.Event()
    asked: list[str] = []

    async def one_answer_then_close(stream: trio.SocketStream) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(OK)
        await stream.aclose()  # no `connection: close`: the client finds out on reuse
        closed.set()

    async def resend(why: str) -> bool:
        asked.append(why)
        return allowed

    async with trio.open_nursery() as nursery:
        url, connections = await start(nursery, one_answer_then_close)
        client = Client()
        assert await body_of(client, url) == b"hello world"
        await closed.wait()  # the server hung up on the kept-alive connection
        if allowed:
            assert await body_of(client, url, resend=resend) == b"hello world"
        else:
            with pytest.raises(ConnectionLost):
                await body_of(client, url, resend=resend)
        assert len(asked) == 1 and "kept-alive connection lost" in asked[0]
        assert len(connections) == (2 if allowed else 1)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_idle_connections_expire_and_have_tcp_keepalive(autojump_clock):
    async with trio.open_nursery() as nursery:
        url, connections = await start(nursery, keep_alive)
        client = Client(idle_expiry_s=4)
        await body_of(client, url)
        (idle,) = [c for pool in client._idle.values() for c in pool]
        assert idle.stream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        await trio.sleep(3)
        await body_of(client, url)
        assert len(connections) == 1  # reused within its expiry
        await trio.sleep(5)
        await body_of(client, url)
        assert len(connections) == 2  # expired: closed, and a fresh one opened
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_private_ca_named_in_ssl_cert_file_is_trusted(tmp_path, monkeypatch):
    # LiteLLM's path (httpx) honours SSL_CERT_FILE; this one ignored it.
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))

    async def answer(stream: trio.SSLStream) -> None:
        try:
            await read_request(stream, bytearray())
            await stream.send_all(OK)
        except trio.BrokenResourceError:
            pass  # the client refused our certificate

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, answer, 0, server,
                                                host="127.0.0.1"))
        url = f"https://127.0.0.1:{listeners[0].transport_listener.socket.getsockname()[1]}/v1"
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        client = Client()
        with pytest.raises(ssl.SSLCertVerificationError):  # not worth retrying
            await body_of(client, url)
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
        trusting = Client()
        assert await body_of(trusting, url) == b"hello world"
        await client.aclose()
        await trusting.aclose()
        nursery.cancel_scope.cancel()


async def test_a_body_cut_mid_chunk_is_connection_lost_and_not_reused():
    async def cut(stream: trio.SocketStream) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        url, _ = await start(nursery, cut)
        client = Client()
        with pytest.raises(ConnectionLost):
            await body_of(client, url)
        assert not any(client._idle.values())
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_content_length_bodies_and_headers_are_read():
    async def error(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        while await read_request(stream, buffer):
            await stream.send_all(b"HTTP/1.1 429 Too Many\r\nretry-after: 2\r\nX-A: 1\r\nx-a: 2\r\n"
                                  b"content-length: 7\r\n\r\n{\"e\":1}")

    async with trio.open_nursery() as nursery:
        url, connections = await start(nursery, error)
        client = Client()
        for _ in range(2):
            async with client.stream_post(url, {}, b"{}") as response:
                assert (response.status, response.reason) == (429, "Too Many")
                assert response.headers["retry-after"] == "2" and response.headers["x-a"] == "1, 2"
                assert await response.read(1000) == b'{"e":1}'
        assert len(connections) == 1  # a fully read error answer keeps the connection
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_header_injection_is_refused():
    client = Client()
    with pytest.raises(ValueError, match="line break"):
        async with client.stream_post("http://127.0.0.1:9/x", {"authorization": "a\r\nx: y"}, b""):
            pass
