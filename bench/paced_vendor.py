"""The scripted OpenAI-compatible vendor at a steady token rate, for thousands of streams.

bench/vendor.py's answers are the same bytes (its pre-built chunks: a role chunk, "t0 ",
"t1 ", ... each its own SSE event in its own HTTP chunk, a finish chunk, a usage chunk when
asked, `[DONE]`); what differs is the pacing. There each stream is a Trio task that sleeps
before each token: about 100 µs of the vendor's CPU per token on this 2-core machine, so
1,000 streams at 20 tokens/s would need two cores for the vendor alone, and each sleep's
overshoot adds up (a 1.6 s answer took 2.1 s). Here the streams are asyncio protocols under
uvloop: each token is one timer and one `transport.write`, due at an absolute time
(`start + (i + 1) * delay`), so an answer streams at its rate however late one write was.

Every answer's first token comes `--token-ms` after its request (as each later one does),
so a direct call's time to first token is that delay.

    python -m bench.paced_vendor --port 0 --token-ms 50   # prints its URL, then serves
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import cast

from bench.vendor import MAX_BODY, Vendor, _chunked

HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n")
END = _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Counts:
    def __init__(self) -> None:
        self.streams = 0  # answered since start
        self.active = 0  # streaming now


class Connection(asyncio.Protocol):
    """One client connection: requests one after another (keep-alive), each answered
    with a paced stream."""

    def __init__(self, answers: Vendor, delay_s: float, counts: Counts) -> None:
        self.answers, self.delay_s, self.counts = answers, delay_s, counts
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.streaming:
            self.streaming = False
            self.counts.active -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_BODY and self.transport is not None:
            self.transport.close()
            return
        self.next_request()

    def next_request(self) -> None:
        """Answer the buffered request, if one has arrived whole and none is streaming."""
        if self.streaming or b"\r\n\r\n" not in self.buffer:
            return
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in header_lines)}
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            return
        body, self.buffer = rest[:length], rest[length:]
        method, path, _ = request_line.split(" ", 2)
        if method == "POST" and path.endswith("/chat/completions"):
            self.stream(json.loads(body or b"{}"), len(body))
        elif method == "GET" and path.endswith("/_stats"):
            self.reply(200, {"active": self.counts.active, "streams": self.counts.streams})
        elif method == "GET" and path.endswith("/models"):
            self.reply(200, {"object": "list", "data": [{"id": "bench", "object": "model"}]})
        else:
            self.reply(404, {"error": {"message": f"no route {method} {path}"}})

    def reply(self, status: int, payload: dict[str, object]) -> None:
        body = json.dumps(payload).encode()
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (status, len(body), body))
        self.next_request()

    def stream(self, request: dict[str, object], size: int) -> None:
        wanted = request.get("max_tokens") or request.get("max_completion_tokens") or 50
        count = min(int(cast(int, wanted)), len(self.answers.tokens))
        options = request.get("stream_options")
        usage = isinstance(options, dict) and bool(cast(dict[str, object], options).get(
            "include_usage"))
        tail = self.answers.finish["length" if count == len(self.answers.tokens) else "stop"]
        if usage:
            tail += self.answers.usage(max(1, size // 4), count)
        self.counts.streams += 1
        self.counts.active += 1
        self.streaming = True
        assert self.transport is not None
        self.transport.write(HEAD + self.answers.role)
        self.token(0, count, time.monotonic(), tail + END)

    def token(self, index: int, count: int, start: float, tail: bytes) -> None:
        """Token `index` is due at start + (index + 1) * delay: write it when it is."""
        if self.transport is None:
            return
        if index:
            self.transport.write(self.answers.tokens[index - 1])
        if index < count:
            self.timer = self.loop.call_at(start + (index + 1) * self.delay_s, self.token,
                                           index + 1, count, start, tail)
            return
        self.transport.write(tail)
        self.timer = None
        self.streaming = False
        self.counts.active -= 1
        self.next_request()


async def serve(port: int, max_tokens: int, delay_s: float) -> None:
    answers, counts = Vendor(max_tokens), Counts()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(answers, delay_s, counts), "127.0.0.1",
                                      port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    print(f"http://127.0.0.1:{bound}/v1", flush=True)
    await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paced_vendor",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=2048, help="the longest answer it can give")
    parser.add_argument("--token-ms", type=float, default=50.0,
                        help="from the request to the first token, and between tokens")
    args = parser.parse_args(argv)
    import resource

    import uvloop

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        uvloop.run(serve(args.port, args.tokens, args.token_ms / 1000))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
