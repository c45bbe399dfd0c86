"""A fast scripted OpenAI-compatible vendor for the benchmark, in its own process.

The test suite's ScriptedLLM (a thread per connection, JSON built per chunk)
is made for scripting failures, not for speed: at a thousand streams it would
be the bottleneck being measured. This one is a Trio server that writes
pre-built SSE chunks, so its own cost per token is well under a microsecond
and nearly all the CPU on the machine is left to the worker being measured.

Each answer has `max_tokens` distinct tokens ("t0 ", "t1 ", ...: LiteLLM
rejects a stream that repeats one chunk 100 times), each its own SSE event in
its own HTTP chunk, as real vendors send them, then a finish chunk, a usage
chunk and `[DONE]`. The pace is set per run with `POST /_pace
{"token_delay_s": 0.05}`; 0 means as fast as the socket takes them (written
in groups, so a reader sees many events per read, like a fast real vendor).

    python -m bench.vendor --port 0 --tokens 5000   # prints its URL, then serves
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

MAX_BODY = 4 * 1024 * 1024
GROUP = 32  # chunks per write when streaming as fast as possible


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload: dict) -> bytes:
    return _chunked(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


class Vendor:
    def __init__(self, max_tokens: int) -> None:
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                "model": "bench"}
        self.tokens = [_event({**base, "choices": [
            {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]})
            for i in range(max_tokens)]
        self.role = _event({**base, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        self.finish = {reason: _event({**base, "choices": [
            {"index": 0, "delta": {}, "finish_reason": reason}]}) for reason in ("stop", "length")}
        self.base = base
        self.token_delay_s = 0.0
        self.streams = 0  # answered since start, for the benchmark's sanity checks
        self.active = 0  # streaming now

    def usage(self, prompt: int, completion: int) -> bytes:
        return _event({**self.base, "choices": [], "usage": {
            "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}})

    async def serve(self, stream: trio.SocketStream) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in header_lines)}
                length = int(headers.get("content-length", "0"))
                if length > MAX_BODY:
                    return
                while len(buffer) < length:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                body, buffer = buffer[:length], buffer[length:]
                method, path, _ = request_line.split(" ", 2)
                await self.answer(stream, method, path, body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            return

    async def answer(self, stream: trio.SocketStream, method: str, path: str, body: bytes) -> None:
        if method == "POST" and path.endswith("/_pace"):
            self.token_delay_s = float(json.loads(body)["token_delay_s"])
            await _reply_json(stream, 200, {"token_delay_s": self.token_delay_s})
        elif method == "GET" and path.endswith("/_stats"):
            await _reply_json(stream, 200, {"active": self.active, "streams": self.streams})
        elif method == "GET" and path.endswith("/models"):
            await _reply_json(stream, 200, {"object": "list", "data": [{"id": "bench"}]})
        elif method == "POST" and path.endswith("/chat/completions"):
            request = json.loads(body or b"{}")
            wanted = request.get("max_tokens") or request.get("max_completion_tokens") or 50
            count = min(int(wanted), len(self.tokens))
            prompt = max(1, len(body) // 4)
            await self.stream(stream, count, prompt, bool(
                (request.get("stream_options") or {}).get("include_usage")))
        else:
            await _reply_json(stream, 404, {"error": {"message": f"no route {method} {path}"}})

    async def stream(self, stream: trio.SocketStream, count: int, prompt: int,
                     include_usage: bool) -> None:
        self.streams += 1
        self.active += 1
        try:
            await self._send(stream, count, prompt, include_usage)
        finally:
            self.active -= 1

    async def _send(self, stream: trio.SocketStream, count: int, prompt: int,
                    include_usage: bool) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                              b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
                              + self.role)
        delay = self.token_delay_s
        if delay > 0:
            for i in range(count):
                await trio.sleep(delay)
                await stream.send_all(self.tokens[i])
        else:
            for start in range(0, count, GROUP):
                await stream.send_all(b"".join(self.tokens[start:min(start + GROUP, count)]))
        tail = self.finish["length" if count == len(self.tokens) else "stop"]
        if include_usage:
            tail += self.usage(prompt, count)
        await stream.send_all(tail + _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")


async def _reply_json(stream: trio.SocketStream, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await stream.send_all(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n"
                          b"content-length: %d\r\n\r\n%s" % (status, len(body), body))


async def main_async(port: int, max_tokens: int) -> None:
    vendor = Vendor(max_tokens)
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=4096)
    bound = listeners[0].socket.getsockname()[1]
    print(f"http://127.0.0.1:{bound}/v1", flush=True)
    await trio.serve_listeners(vendor.serve, listeners)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vendor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=2048, help="the longest answer it can give")
    args = parser.parse_args(argv)
    try:
        trio.run(main_async, args.port, args.tokens)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
