"""The streaming HTTP/1.1 client: chunked decoding, keep-alive, stale connections."""

from __future__ import annotations

from functools import partial

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from actors.adapters.http1 import ChunkedDecoder, Client, ConnectionLost, ProtocolError


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


@pytest.mark.parametrize("bad", [b"zz\r\nabc\r\n", b"3\r\nabcXY", b"9" * 2000])
def test_malformed_chunking_is_a_protocol_error(bad):
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(bad)


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


async def body_of(client: Client, url: str) -> bytes:
    async with client.stream_post(url, {"content-type": "application/json"}, b"{}") as response:
        assert response.status == 200
        return b"".join([piece async for piece in response.pieces()])


async def test_a_finished_response_leaves_its_connection_for_the_next_request():
    async def keep_alive(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        while await read_request(stream, buffer):
            await stream.send_all(OK)

    async with trio.open_nursery() as nursery:
        url, connections = await start(nursery, keep_alive)
        client = Client()
        assert [await body_of(client, url) for _ in range(3)] == [b"hello world"] * 3
        assert len(connections) == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_connection_the_server_closed_while_idle_is_replaced_once():
    closed = trio.Event()

    async def one_answer_then_close(stream: trio.SocketStream) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(OK)
        await stream.aclose()  # no `connection: close`: the client finds out on reuse
        closed.set()

    async with trio.open_nursery() as nursery:
        url, connections = await start(nursery, one_answer_then_close)
        client = Client()
        assert await body_of(client, url) == b"hello world"
        await closed.wait()  # the server hung up on the kept-alive connection
        assert await body_of(client, url) == b"hello world"
        assert len(connections) == 2
        await client.aclose()
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
