"""A scripted OpenAI-compatible vendor over real HTTP on loopback.

Only the LLM vendor is scripted in the tests: LiteLLM's real client talks to
this server through real sockets and real SSE. A test queues `Reply` scripts
(tokens, delays, status codes, mid-stream failures) and reads back what the
server was sent and whether the client hung up early.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    tokens: tuple[str, ...] = ("Hello", ",", " world", "!")
    token_delay_s: float = 0.0
    first_token_delay_s: float = 0.0
    status: int = 200
    error_body: str = '{"error": {"message": "scripted failure", "type": "server_error"}}'
    headers: tuple[tuple[str, str], ...] = ()
    # Drop the connection after this many tokens (None: finish normally).
    break_after: int | None = None
    # ... or, with break_after, end the HTTP body cleanly there, the SSE events that
    # finish the answer never sent (Anthropic: no message_delta, no message_stop).
    end_clean: bool = False
    finish_reason: str = "stop"
    prompt_tokens: int | None = None  # None: count words of the prompt
    report_usage: bool = True
    # Broken HTTP: these bytes are the whole answer, then the connection closes.
    raw: bytes | None = None
    # Streamed before the tokens, each in its own chunk under `reasoning_field`
    # (DeepSeek and vLLM say reasoning_content; OpenRouter and Ollama say reasoning).
    reasoning: tuple[str, ...] = ()
    reasoning_field: str = "reasoning_content"
    # After the tokens: (id, name, argument pieces) per call, split as OpenAI does: the
    # id, name and an empty argument string first, then the pieces, one chunk each.
    tool_calls: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    # A usage block recorded from the real vendor, sent in its own form instead of the
    # counted one: OpenAI's `usage`, Anthropic's message_start `usage` (its
    # output_tokens go in message_delta), Gemini's `usageMetadata`.
    usage: dict[str, Any] | None = None
    # As llama.cpp and Anthropic do: a request ending in an assistant turn whose text is
    # the start of `tokens` (at a token boundary) gets only the tokens after it.
    continues: bool = False
    # Hold the stream this long after its `pause_after`-th chunk (reasoning, answer text
    # and tool-call pieces count, in the order sent): a worker stopped meanwhile is
    # stopped exactly there.
    pause_after: int | None = None
    pause_s: float = 0.0
    after_tools: tuple[str, ...] = ()  # answer text sent after the tool-call pieces
    # Anthropic's redacted reasoning: one `redacted_thinking` block per item (its data),
    # streamed before the signed thinking block.
    redacted: tuple[str, ...] = ()

    def after(self, messages: list[dict[str, Any]]) -> tuple[str, ...]:
        """The tokens this reply streams for a request of `messages`. A prefill that
        is the start of the tokens up to a token boundary, less any whitespace it ends
        with (no vendor takes that), is continued: the whitespace comes first."""
        last = messages[-1] if messages else {}
        if not self.continues or last.get("role") != "assistant":
            return self.tokens
        prefix, text = text_of(last.get("content")), ""
        for n in range(len(self.tokens) + 1):
            if prefix in (text, text.rstrip()):
                rest, held = self.tokens[n:], text[len(prefix):]
                if not held:
                    return rest
                return (held + rest[0], *rest[1:]) if rest else (held,)
            if n < len(self.tokens):
                text += self.tokens[n]
        return self.tokens


def text_of(content: Any) -> str:
    """A message's text: a string, or the text blocks of Anthropic's content list."""
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content
                       if isinstance(b, dict) and b.get("type") == "text")
    return content or ""


# The models that refuse a request ending in an assistant turn, as the real vendors do
# (LiteLLM's map agrees: supports_assistant_prefill false): Claude 4.6 and later.
_NO_PREFILL_CLAUDE = re.compile(r"claude-(?:\w+-)?(?:4-[6-9]|[5-9])(?:\b|-|$)")
ANTHROPIC_REFUSAL = json.dumps({"type": "error", "error": {
    "type": "invalid_request_error",
    "message": "This model does not support assistant message prefill. The conversation "
               "must end with a user message."}, "request_id": "req_scripted"})
MISTRAL_REFUSAL = json.dumps({
    "object": "error", "message": "Expected last role User or Tool (or Assistant with prefix "
    "True) for serving but got assistant", "type": "invalid_request_message_order",
    "param": None, "code": "3230"})


def refusal(path: str, payload: dict[str, Any]) -> str | None:
    """The 400 body a real vendor sends for this request's trailing assistant turn:
    Anthropic for its 4.6+ models, Mistral when the turn lacks `prefix: true`."""
    messages = payload.get("messages") or []
    last = messages[-1] if messages else {}
    if last.get("role") != "assistant":
        return None
    model = str(payload.get("model", ""))
    if path.rstrip("/").endswith("/messages") and _NO_PREFILL_CLAUDE.search(model):
        return ANTHROPIC_REFUSAL
    if model.startswith(("mistral", "codestral")) and last.get("prefix") is not True:
        return MISTRAL_REFUSAL
    return None


@dataclass
class Call:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    started_at: float
    wall_at: float = field(default_factory=time.time)  # comparable with the events' `ts`
    tokens_sent: int = 0
    chunks_sent: int = 0  # reasoning, answer text and tool-call pieces
    finished: bool = False
    disconnected: bool = False
    cut: bool = False  # the reply broke off mid-answer (break_after)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])


@dataclass
class ScriptedLLM:
    default: Reply = field(default_factory=Reply)
    _queue: deque[Reply] = field(default_factory=deque)
    calls: list[Call] = field(default_factory=list)
    active: int = 0  # requests being answered now
    max_active: int = 0  # the most at once since the last reset
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _server: ThreadingHTTPServer | None = None

    def queue(self, *replies: Reply) -> None:
        with self._cond:
            self._queue.extend(replies)

    def _next_reply(self, messages: list[dict[str, Any]]) -> Reply:  # (subclasses read it)
        with self._cond:
            return self._queue.popleft() if self._queue else self.default

    def _record(self, call: Call) -> None:
        with self._cond:
            self.calls.append(call)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self._cond.notify_all()

    def _ended(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify_all()

    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_until(self, predicate: Any, timeout: float = 30.0) -> None:
        """Block (in a thread) until predicate(calls) holds; raise on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.calls):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"scripted LLM: condition not met; calls={self.calls}")
                self._cond.wait(left)

    def reset(self) -> None:
        with self._cond:
            self._queue.clear()
            self.calls.clear()
            self.max_active = self.active
            self.default = Reply()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> ScriptedLLM:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Small SSE writes must leave at once, not wait for Nagle + delayed ACK.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError):
                    pass  # a client that was killed or cancelled: nothing to answer

            def do_GET(self) -> None:
                body = json.dumps({"object": "list", "data": [{"id": "scripted"}]}).encode()
                self._send_json(200, body)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                payload = json.loads(self.rfile.read(length) or b"{}")
                call = Call(self.path, payload, dict(self.headers.items()), time.monotonic())
                owner._record(call)
                try:
                    self._answer(call, payload)
                finally:
                    owner._ended()

            def _answer(self, call: Call, payload: dict[str, Any]) -> None:
                reply = owner._next_reply(call.messages)
                if reply.raw is not None:
                    with contextlib.suppress(OSError):
                        self.wfile.write(reply.raw)
                        self.wfile.flush()
                    self.close_connection = True
                    call.finished = True
                    owner._changed()
                    return
                refused = refusal(self.path, payload)
                if refused is not None or reply.status != 200:
                    if refused is not None:
                        reply = Reply(status=400, error_body=refused)
                    self._send_json(reply.status, reply.error_body.encode(), reply.headers)
                    call.finished = True
                    owner._changed()
                    return
                try:
                    if ":streamGenerateContent" in self.path:
                        self._stream_gemini(call, payload, reply)
                    elif payload.get("stream") and self.path.rstrip("/").endswith("/messages"):
                        self._stream_anthropic(call, payload, reply)
                    elif payload.get("stream"):
                        self._stream(call, payload, reply)
                    else:
                        self._complete(call, payload, reply)
                except (BrokenPipeError, ConnectionResetError):
                    call.disconnected = True
                    owner._changed()
                    self.close_connection = True

            def _send_json(self, status: int, body: bytes,
                           headers: tuple[tuple[str, str], ...] = ()) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _sent(self, call: Call, reply: Reply) -> None:
                """One more chunk is out; hold the stream after the `pause_after`-th."""
                call.chunks_sent += 1
                owner._changed()
                if call.chunks_sent == reply.pause_after:
                    time.sleep(reply.pause_s)

            def _usage(self, payload: dict[str, Any], reply: Reply, sent: int) -> dict[str, int]:
                prompt = reply.prompt_tokens
                if prompt is None:
                    prompt = sum(len(str(m.get("content", "")).split())
                                 for m in payload.get("messages", []))
                return {"prompt_tokens": prompt, "completion_tokens": sent,
                        "total_tokens": prompt + sent}

            def _complete(self, call: Call, payload: dict[str, Any], reply: Reply) -> None:
                text = "".join(reply.tokens)
                body = {"id": "chatcmpl-scripted", "object": "chat.completion",
                        "created": int(time.time()), "model": payload.get("model", "scripted"),
                        "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": self._usage(payload, reply, len(reply.tokens))}
                self._send_json(200, json.dumps(body).encode())
                call.tokens_sent = len(reply.tokens)
                call.finished = True
                owner._changed()

            def _chunk(self, payload: dict[str, Any], **fields: Any) -> None:
                chunk = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk",
                         "created": int(time.time()), "model": payload.get("model", "scripted"),
                         **fields}
                data = f"data: {json.dumps(chunk)}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _event(self, kind: str, data: dict[str, Any]) -> None:
                body = f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(body), body))
                self.wfile.flush()

            def _stream_anthropic(self, call: Call, payload: dict[str, Any], reply: Reply) -> None:
                """The Anthropic Messages SSE: redacted thinking blocks, a signed thinking
                block, the text (continuing a prefill when `continues`), then one tool_use
                block per call with its input as input_json_delta pieces."""
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                self._event("message_start", {"message": {
                    "id": "msg_scripted", "type": "message", "role": "assistant", "content": [],
                    "model": payload.get("model", "scripted"), "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {**(reply.usage or {"input_tokens": 10}), "output_tokens": 1}}})
                blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = [
                    ({"type": "redacted_thinking", "data": data}, []) for data in reply.redacted]
                if reply.reasoning:
                    blocks.append(({"type": "thinking", "thinking": "", "signature": ""},
                                   [{"type": "thinking_delta", "thinking": t}
                                    for t in reply.reasoning]
                                   + [{"type": "signature_delta", "signature": "sig-scripted"}]))
                if tokens := reply.after(payload.get("messages") or []):
                    blocks.append(({"type": "text", "text": ""},
                                   [{"type": "text_delta", "text": t} for t in tokens]))
                for call_id, name, pieces in reply.tool_calls:
                    blocks.append(({"type": "tool_use", "id": call_id, "name": name, "input": {}},
                                   [{"type": "input_json_delta", "partial_json": piece}
                                    for piece in ("", *pieces)]))
                texts = 0
                for index, (start, deltas) in enumerate(blocks):
                    self._event("content_block_start", {"index": index, "content_block": start})
                    for delta in deltas:
                        if delta["type"] == "text_delta":
                            if reply.break_after is not None and texts >= reply.break_after:
                                if reply.end_clean:
                                    self.wfile.write(b"0\r\n\r\n")
                                    self.wfile.flush()
                                self.close_connection = True  # cut: no stop events
                                call.finished = call.cut = True
                                owner._changed()
                                return
                            texts += 1
                            if texts > 1 and reply.token_delay_s:
                                time.sleep(reply.token_delay_s)
                        self._event("content_block_delta", {"index": index, "delta": delta})
                        call.tokens_sent += 1
                        self._sent(call, reply)
                    self._event("content_block_stop", {"index": index})
                stop = "tool_use" if reply.tool_calls else "end_turn"
                output = (reply.usage or {}).get("output_tokens", call.tokens_sent)
                self._event("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None},
                                              "usage": {"output_tokens": output}})
                self._event("message_stop", {})
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                call.finished = True
                owner._changed()

            def _stream_gemini(self, call: Call, payload: dict[str, Any], reply: Reply) -> None:
                """Gemini's streamGenerateContent?alt=sse: one GenerateContentResponse per
                token, the usage metadata on the last."""
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for i, token in enumerate(reply.tokens):
                    last = i == len(reply.tokens) - 1
                    candidate: dict[str, Any] = {"content": {"parts": [{"text": token}],
                                                             "role": "model"}, "index": 0}
                    body: dict[str, Any] = {"candidates": [candidate], "responseId": "scripted",
                                            "modelVersion": "scripted"}
                    if last:
                        candidate["finishReason"] = "STOP"
                        body["usageMetadata"] = reply.usage or {
                            "promptTokenCount": 10, "candidatesTokenCount": len(reply.tokens),
                            "totalTokenCount": 10 + len(reply.tokens)}
                    data = f"data: {json.dumps(body)}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    call.tokens_sent += 1
                    owner._changed()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                call.finished = True
                owner._changed()

            def _stream(self, call: Call, payload: dict[str, Any], reply: Reply) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                if reply.first_token_delay_s:
                    time.sleep(reply.first_token_delay_s)
                for i, thought in enumerate(reply.reasoning):
                    if i and reply.token_delay_s:
                        time.sleep(reply.token_delay_s)
                    delta = {reply.reasoning_field: thought, "content": None}
                    if not i:
                        delta["role"] = "assistant"
                    self._chunk(payload, choices=[{"index": 0, "delta": delta,
                                                   "finish_reason": None}])
                    self._sent(call, reply)
                for i, token in enumerate(reply.after(payload.get("messages") or [])):
                    if reply.break_after is not None and i >= reply.break_after:
                        # Abort mid-stream: no terminating chunk, connection closed.
                        self.close_connection = True
                        call.finished = call.cut = True
                        owner._changed()
                        return
                    if i and reply.token_delay_s:
                        time.sleep(reply.token_delay_s)
                    delta = {"content": token} if i else {"role": "assistant", "content": token}
                    self._chunk(payload, choices=[{"index": 0, "delta": delta,
                                                   "finish_reason": None}])
                    call.tokens_sent += 1
                    owner._changed()
                    self._sent(call, reply)
                for index, (call_id, name, pieces) in enumerate(reply.tool_calls):
                    first = {"index": index, "id": call_id, "type": "function",
                             "function": {"name": name, "arguments": ""}}
                    for part in [first, *({"index": index, "function": {"arguments": piece}}
                                          for piece in pieces)]:
                        self._chunk(payload, choices=[{"index": 0, "finish_reason": None,
                                                       "delta": {"tool_calls": [part]}}])
                        self._sent(call, reply)
                for token in reply.after_tools:
                    self._chunk(payload, choices=[{"index": 0, "delta": {"content": token},
                                                   "finish_reason": None}])
                    self._sent(call, reply)
                self._chunk(payload, choices=[{"index": 0, "delta": {},
                                               "finish_reason": reply.finish_reason}])
                wants_usage = (payload.get("stream_options") or {}).get("include_usage")
                if wants_usage and reply.report_usage:
                    self._chunk(payload, choices=[], usage=reply.usage
                                or self._usage(payload, reply, call.tokens_sent))
                end = b"data: [DONE]\n\n"
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(end), end))
                self.wfile.flush()
                call.finished = True
                owner._changed()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="scripted-llm",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
