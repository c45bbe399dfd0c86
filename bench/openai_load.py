"""The streaming load bench frontdoor puts on each side: N concurrent streaming chat
completions against one OpenAI-compatible URL, in a process of its own.

The same generator for every side (the vendor itself, our front door, LiteLLM Proxy), so
whatever it costs is the same for all three, and its CPU is counted on none. Each of
`--streams` keep-alive connections runs one `POST .../chat/completions` (`stream: true`)
after another: a closed loop, as a chat client does. The streams start spread over one
answer's length so that requests arrive at a steady rate, not in waves. After the warm-up
the window opens: it lasts `--seconds`; the parent samples each side's CPU when the
generator says the window opened and closed (one JSON line each on stdout).

Time to first token is from the request's last byte written to the first byte that holds
answer text (a `delta.content` holding the vendor's tokens: "t0 ", "t1 ", ...; the empty
role chunk does not count), for the requests sent inside the window. Tokens are counted as they
arrive inside the window. A stream is complete when it has every token it asked for and
`data: [DONE]`; anything else is counted as incomplete, a status other than 200 as an
error (the first few named).

HTTP is parsed by httptools (llhttp, C) under uvloop: the cheapest client there is, since
it shares the cores with the sides being measured.

    python -m bench.openai_load --url http://127.0.0.1:PORT/v1/chat/completions \\
        --key KEY --model bench --streams 100 --tokens 64 --answer-s 1.6 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

# The scripted vendor's tokens ("t12 ") as any side re-encodes them: one per chunk, or
# several ("t12 t13 ") where a side coalesces what arrived together.
CONTENT = re.compile(rb'"content": ?"((?:t\d+ )+)"')
DONE = b"data: [DONE]"
RETRY_PAUSE_S = 0.1  # after a refusal, before the stream's next request
DRAIN_S = 30.0  # longest wait for the requests still streaming when the window closes


@dataclass
class Tally:
    """What the streams saw, shared by all of them."""

    window: tuple[float, float] = (float("inf"), float("inf"))  # perf_counter, open..close
    ttft_s: list[float] = field(default_factory=list[float])  # requests sent in the window
    tokens: int = 0  # arrived in the window
    completed: int = 0  # complete answers that ended in the window
    incomplete: int = 0  # answers that ended without every token or [DONE] (any time)
    errors: int = 0  # statuses other than 200, broken connections (any time)
    statuses: dict[str, int] = field(default_factory=dict[str, int])
    first_errors: list[str] = field(default_factory=list[str])

    def inside(self, moment: float) -> bool:
        return self.window[0] <= moment < self.window[1]

    def error(self, what: str) -> None:
        self.errors += 1
        self.statuses[what.split(" ", 1)[0]] = self.statuses.get(what.split(" ", 1)[0], 0) + 1
        if len(self.first_errors) < 5:
            self.first_errors.append(what[:300])


class Stream(asyncio.Protocol):
    """One connection: a request, its streamed answer, the next request."""

    def __init__(self, address: tuple[str, int], request: bytes, tokens: int, tally: Tally,
                 running: asyncio.Event) -> None:
        self.address, self.request, self.tokens, self.tally = address, request, tokens, tally
        self.running = running
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reset()

    async def connect(self) -> None:
        """(Again, when the server closed the last one: a stream stays a stream.)"""
        self.parser = httptools.HttpResponseParser(self)
        try:
            await asyncio.get_running_loop().create_connection(lambda: self, *self.address)
        except OSError as exc:
            self.tally.error(f"connect {exc}")
            if not self.closed.done():
                self.closed.set_result(None)

    def reset(self) -> None:
        self.sent_at = 0.0
        self.seen = 0
        self.done = False
        self.tail = b""
        self.body_head = b""

    # -- the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.send()

    def send(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if not self.running.is_set():
            self.transport.close()
            return
        self.reset()
        self.busy = True
        self.transport.write(self.request)
        self.sent_at = time.perf_counter()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.tally.error(f"broken-http {exc}")
            self.busy = False
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.busy:  # the server hung up mid-answer
            self.busy = False
            self.tally.error(f"hung-up {exc or 'closed'}")
        if self.running.is_set():
            asyncio.get_running_loop().call_later(RETRY_PAUSE_S, asyncio.ensure_future,
                                                  self.connect())
        elif not self.closed.done():
            self.closed.set_result(None)

    # -- httptools' callbacks

    def on_body(self, body: bytes) -> None:
        now = time.perf_counter()
        if self.parser.get_status_code() != 200:
            self.body_head = (self.body_head + body)[:300]
            return
        text = self.tail + body
        end = text.rfind(b"\n")
        if end < 0:
            self.tail = text[-4096:]
            return
        whole, self.tail = text[:end], text[end + 1:]
        found = sum(match[1].count(b" ") for match in CONTENT.finditer(whole))
        if found:
            if not self.seen and self.tally.inside(self.sent_at):
                self.tally.ttft_s.append(now - self.sent_at)
            self.seen += found
            if self.tally.inside(now):
                self.tally.tokens += found
        if DONE in whole:
            self.done = True

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        self.busy = False
        status = self.parser.get_status_code()
        retry = False
        if status != 200:
            self.tally.error(f"{status} {self.body_head.decode(errors='replace')}")
            retry = True
        elif self.seen == self.tokens and self.done:
            if self.tally.inside(now):
                self.tally.completed += 1
        else:
            self.tally.incomplete += 1
            if len(self.tally.first_errors) < 5:
                self.tally.first_errors.append(f"incomplete: {self.seen} of {self.tokens} "
                                               f"tokens, [DONE] {'seen' if self.done else 'not seen'}")
        if not self.parser.should_keep_alive():
            if self.transport is not None:
                self.transport.close()  # (connection_lost connects again)
            return
        if retry:
            asyncio.get_running_loop().call_later(RETRY_PAUSE_S, self.send)
        else:
            self.send()


def request_bytes(url: str, key: str, model: str, tokens: int) -> bytes:
    parts = urlsplit(url)
    body = json.dumps({"model": model, "stream": True, "max_tokens": tokens,
                       "messages": [{"role": "user", "content": "Stream the benchmark answer."}]},
                      separators=(",", ":")).encode()
    return (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def percentile(values: list[float], q: float) -> float | None:
    """As bench/perf.py reads one (nearest rank over n - 1), None of no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def run(args: argparse.Namespace) -> None:
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = request_bytes(args.url, args.key, args.model, args.tokens)
    tally = Tally()
    running = asyncio.Event()
    running.set()
    streams: list[Stream] = []
    began = time.perf_counter()

    async def open_stream(at: float) -> None:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - began)))
        stream = Stream((host, port), request, args.tokens, tally, running)
        streams.append(stream)
        await stream.connect()

    # Spread over one answer's length: each stream's requests then come at their own phase.
    spread = args.answer_s if args.streams > 1 else 0.0
    await asyncio.gather(*[open_stream(spread * i / args.streams) for i in range(args.streams)])
    await asyncio.sleep(max(0.0, args.warm_s - (time.perf_counter() - began)))
    opened = time.perf_counter()
    tally.window = (opened, opened + args.seconds)
    say({"phase": "window", "streams": sum(s.transport is not None for s in streams)})
    await asyncio.sleep(args.seconds)
    say({"phase": "closed"})
    running.clear()  # no new request; the ones streaming end
    deadline = time.perf_counter() + DRAIN_S
    while any(s.busy for s in streams) and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # (polled: an answer's end is a callback, not an event)
    unfinished = sum(s.busy for s in streams)
    for stream in streams:
        stream.busy = False  # (counted as unfinished, not as hung up)
        if stream.transport is not None:
            stream.transport.close()
    if streams:
        await asyncio.wait([s.closed for s in streams], timeout=5)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    ttft_ms = [1e3 * v for v in tally.ttft_s]
    say({"phase": "done", "streams": args.streams,
         "seconds": args.seconds, "requests": len(ttft_ms), "tokens": tally.tokens,
         "completed": tally.completed, "incomplete": tally.incomplete, "errors": tally.errors,
         "unfinished": unfinished, "statuses": tally.statuses, "first_errors": tally.first_errors,
         "ttft_p50_ms": percentile(ttft_ms, 50), "ttft_p90_ms": percentile(ttft_ms, 90),
         "ttft_p99_ms": percentile(ttft_ms, 99), "ttft_max_ms": max(ttft_ms, default=None),
         "client_cpu_s": usage.ru_utime + usage.ru_stime})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openai_load",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the chat completions URL")
    parser.add_argument("--key", default="none", help="sent as Authorization: Bearer KEY")
    parser.add_argument("--model", default="bench")
    parser.add_argument("--streams", type=int, required=True, help="concurrent streams")
    parser.add_argument("--tokens", type=int, required=True, help="max_tokens of each request")
    parser.add_argument("--answer-s", type=float, required=True,
                        help="how long one answer streams (the streams start spread over it)")
    parser.add_argument("--warm-s", type=float, required=True,
                        help="from the start until the window opens")
    parser.add_argument("--seconds", type=float, required=True, help="the window's length")
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop  # a bench dependency, as is httptools (uvicorn[standard])

    uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
