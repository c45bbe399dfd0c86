"""The gateway's HTTP/1.1 server (gateway/http1.py) on real loopback sockets, with a
small ASGI app: framing, keep-alive, hostile heads, a client that vanishes mid-stream,
and shutdown. The gateway's own routes are tested through it in test_gateway*.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio

from gateway.http1 import Limits, serve

LIMITS = Limits(max_head_bytes=4096, keep_alive_s=1.0, graceful_s=2.0)


class App:
    """Answers GET /hello with its body, echoes a POST's body, streams /stream until
    told to stop (or the client goes), and fails on /boom."""

    def __init__(self) -> None:
        self.disconnected = trio.Event()
        self.streaming = trio.Event()
        self.release = trio.Event()
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        path = scope["path"]
        if path == "/boom":
            raise RuntimeError("a bug in the app")
        if path == "/stream":
            await self._stream(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        answer = body if scope["method"] == "POST" else f"hello {path}".encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    async def _stream(self, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
        self.streaming.set()
        async with trio.open_nursery() as nursery:
            async def hang_up() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.disconnected.set()
                nursery.cancel_scope.cancel()

            nursery.start_soon(hang_up)
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"data: two\n\n",
                        "more_body": False})
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def serving(app: App, limits: Limits = LIMITS) -> AsyncIterator[tuple[int, trio.Event]]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(
            app, host="127.0.0.1", port=0, limits=limits, shutdown=stop.wait,
            task_status=task_status))
        yield int(binds[0].rsplit(":", 1)[1]), stop
        stop.set()


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data`, then read until the server closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                received += chunk
        return received


def responses(data: bytes, methods: list[bytes]) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Parse the server's bytes with h11's client side: (status, headers, body) each."""
    client = h11.Connection(h11.CLIENT)
    found: list[tuple[int, dict[bytes, bytes], bytes]] = []
    client.receive_data(data)
    client.receive_data(b"")
    for method in methods:
        client.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = client.next_event()
            if isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                pytest.fail(f"unexpected {event!r}")
        found.append((status, headers, body))
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
    return found


async def test_keep_alive_serves_pipelined_requests_in_order_and_bodies_both_ways():
    async with serving(App()) as (port, _):
        data = await exchange(port, (
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            b"GET /%E2%82%AC?q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    found = responses(data, [b"GET", b"POST", b"POST", b"GET"])
    assert [(s, b) for s, _, b in found] == [(200, b"hello /a"), (200, b"hello"),
                                           (200, b"abcde"), (200, "hello /€".encode())]


async def test_the_scope_says_what_was_asked():
    app = App()
    async with serving(app) as (port, _):
        await exchange(port, b"GET /p%20q?x=%20 HTTP/1.1\r\nHost: h\r\nX-Thing: 1\r\n"
                             b"Connection: close\r\n\r\n")
    scope = app.scopes[0]
    assert (scope["method"], scope["path"], scope["raw_path"], scope["query_string"]) == (
        "GET", "/p q", b"/p%20q", b"x=%20")
    assert (b"x-thing", b"1") in scope["headers"] and scope["http_version"] == "1.1"
    assert scope["client"][0] == "127.0.0.1" and scope["server"][1] == port


@pytest.mark.parametrize(("head", "status"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n", 431),
    (b"NOT A REQUEST\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
])
async def test_a_broken_or_oversized_head_gets_its_status_and_the_server_goes_on(head, status):
    async with serving(App()) as (port, _):
        answer = await exchange(port, head)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:80]
        fine = await exchange(port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert responses(fine, [b"GET"])[0][2] == b"hello /ok"


async def test_a_head_that_trickles_in_is_cut_off_after_keep_alive_s():
    async with serving(App()) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHo")  # and nothing more
            with trio.fail_after(LIMITS.keep_alive_s + 5):
                assert await stream.receive_some(1024) == b""  # closed, no answer


async def test_an_app_that_fails_before_answering_gets_a_500_and_the_connection_closes():
    async with serving(App()) as (port, _):
        answer = await exchange(port, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 500 ") and b"connection: close" in answer.lower()


async def test_http_1_0_and_head_requests_are_framed_as_they_need():
    async with serving(App()) as (port, _):
        old = await exchange(port, b"GET /old HTTP/1.0\r\n\r\n")
        head = await exchange(port, b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert old.startswith(b"HTTP/1.1 200 ") and old.endswith(b"hello /old")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")  # no body


async def test_a_client_waiting_for_100_continue_gets_it_when_the_body_is_read():
    async with serving(App()) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                  b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
            with trio.fail_after(10):
                assert (await stream.receive_some(1024)).startswith(b"HTTP/1.1 100 ")
            await stream.send_all(b"ok")
            received = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(1024):
                    received += chunk
    assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(b"ok")


async def test_a_stream_is_written_as_it_goes_and_learns_when_its_client_leaves():
    app = App()
    async with serving(app) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        with trio.fail_after(10):
            while b"data: one\n\n" not in received:
                received += await stream.receive_some(1024)
        assert b"transfer-encoding: chunked" in received.lower()
        await stream.aclose()
        with trio.fail_after(10):
            await app.disconnected.wait()


async def test_shutdown_closes_idle_connections_and_lets_a_stream_finish():
    app = App()
    async with serving(app, Limits(keep_alive_s=30, graceful_s=10)) as (port, stop):
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        streaming = await trio.open_tcp_stream("127.0.0.1", port)
        await streaming.send_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            await app.streaming.wait()
        stop.set()
        with trio.fail_after(10):
            assert await idle.receive_some(1024) == b""  # closed at once, not after 30 s
        app.release.set()
        received = b""
        with trio.fail_after(10):
            while chunk := await streaming.receive_some(1024):
                received += chunk
        assert received.endswith(b"data: two\n\n\r\n0\r\n\r\n")  # ended whole, then closed
        await idle.aclose()
        await streaming.aclose()


async def test_a_body_refused_before_it_was_read_still_gets_its_answer():
    """The app answers without reading a body the client is still sending: the answer
    arrives whole, and the connection is not reset under the client."""

    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-length", b"0"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": b""})

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(
            refuse, host="127.0.0.1", port=0, limits=LIMITS, shutdown=stop.wait,
            task_status=task_status))
        port = int(binds[0].rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n")
            for _ in range(30):
                await stream.send_all(b" " * 10000)
            received = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(1024):
                    received += chunk
        assert received.startswith(b"HTTP/1.1 413 ")
        stop.set()
