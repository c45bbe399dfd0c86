"""The OpenAI wire format, streamed natively under Trio; LiteLLM for everything else.

LiteLLM builds a pydantic object for every streamed chunk and runs behind the
trio-asyncio bridge: 256-400 us of CPU per chunk, measured. For vendors that
speak the OpenAI chat-completions wire format, this adapter posts the request
directly from Trio (actors.adapters.llm.http1) and decodes each SSE `data:` line
with msgspec into the three fields we use: a few microseconds per chunk.
LiteLLM still does the parts that need its knowledge (actors.adapters.llm.litellm_wire):
it resolves the model to a vendor and its endpoint, maps the request parameters
for that model (`max_completion_tokens` for reasoning models, dropping what a
model refuses), classifies vendor errors, and prices the usage (llm.cost_usd).
A model its map does not know (one a team serves itself) needs none of that
knowledge: actors.adapters.llm.model_map answers for it without importing LiteLLM,
which then loads in the background, for the error answers it classifies. Every
other vendor (Anthropic, Bedrock, Vertex, ...) streams through LiteLLM as before.
`llm.models.<alias>.stream_path` forces either path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import ssl
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import trio
from msgspec import Meta

from actors.adapters.llm import http1
from actors.adapters.llm.model_map import NATIVE_PROVIDERS, Route, native_params, proxied, unmapped
from actors.adapters.llm.prefill import refused_prefill
from actors.errors import PermanentError, TransientError
from config import secret
from messages.mailboxes import (
    ProviderChunk,
    ReasoningDelta,
    StreamFinished,
    TokenDelta,
    ToolCallDelta,
)

if TYPE_CHECKING:
    from actors.adapters.llm.chat import LiteLLMChat

__all__ = ["NATIVE_PROVIDERS", "OpenAIWireChat", "Route", "resolve"]

LITELLM_SIDE = "actors.adapters.llm.litellm_wire"
log = logging.getLogger("chat_actors.openai_wire")
ERROR_BODY_LIMIT = 64 * 1024
MAX_SSE_LINE = 4 * 1024 * 1024  # one `data:` line (a chunk with a large tool call fits)
MAX_TOOL_CALL_INDEX = 127


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallPart(msgspec.Struct):
    index: Annotated[int, Meta(ge=0, le=MAX_TOOL_CALL_INDEX)] = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None  # DeepSeek, vLLM
    reasoning: str | None = None  # OpenRouter, Ollama
    tool_calls: list[_ToolCallPart] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None  # LiteLLM's proxy


class _CompletionDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct):
    """OpenAI's usage block: prompt_tokens holds the cached ones, completion_tokens the
    reasoning ones (contract 3's rule already). Where compatible servers name the
    cached parts otherwise, those names are read too."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None
    prompt_cache_hit_tokens: int | None = None  # DeepSeek
    cache_read_input_tokens: int | None = None  # LiteLLM's proxy, Anthropic-style
    cache_creation_input_tokens: int | None = None

    def parts(self) -> tuple[int, int, int]:
        """(cached, cache write, reasoning) tokens."""
        prompt = self.prompt_tokens_details or _PromptDetails()
        completion = self.completion_tokens_details or _CompletionDetails()
        return (prompt.cached_tokens or self.prompt_cache_hit_tokens
                or self.cache_read_input_tokens or 0,
                prompt.cache_write_tokens or self.cache_creation_input_tokens or 0,
                completion.reasoning_tokens or 0)


class _Chunk(msgspec.Struct):
    """The three fields of a chat.completion.chunk we use; the rest is skipped unparsed."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    model: str | None = None
    error: dict[str, Any] | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
encode = msgspec.json.Encoder().encode


@functools.lru_cache(maxsize=256)
def native_route(model: str, api_base: str | None, api_key_env: str | None) -> Route | None:
    """The route of a model LiteLLM's map does not know, served at `api_base`: no LiteLLM
    needed (model_map)."""
    known = unmapped(model)
    if known is None or not api_base or proxied(api_base):
        return None
    provider, name = known
    return Route(url=api_base.rstrip("/") + "/chat/completions", model=name,
                 provider=provider, api_key_env=api_key_env, mapped_here=True)


def resolve(model: str, api_base: str | None, api_key_env: str | None, stream_path: str) -> Route | None:
    """The native route for a model, or None when it must go through LiteLLM. Imports
    LiteLLM unless model_map answers for the model."""
    if stream_path == "litellm":
        return None
    return (native_route(model, api_base, api_key_env)
            or litellm_side().route(model, api_base, api_key_env, stream_path))


def needs_litellm(models: Iterable[tuple[str, str | None, str | None, str]]) -> bool:
    """Whether any of these (model, api_base, api_key_env, stream_path) needs LiteLLM to
    stream, be priced or be checked."""
    return any(path == "litellm" or native_route(model, base, key) is None
               for model, base, key, path in models)


def litellm_side() -> ModuleType:
    """actors.adapters.llm.litellm_wire: imported here, or waited for while another thread
    imports it (the import lock)."""
    return importlib.import_module(LITELLM_SIDE)


async def litellm_side_async() -> ModuleType:
    """litellm_side without blocking the event loop while LiteLLM is still importing."""
    module = sys.modules.get(LITELLM_SIDE)
    if module is not None and not getattr(module.__spec__, "_initializing", False):
        return module
    return await trio.to_thread.run_sync(litellm_side, abandon_on_cancel=True)


def load_litellm() -> None:
    """The worker's loader thread: import LiteLLM and warm its error mapping."""
    try:
        started = time.perf_counter()
        litellm_side().warm_error_mapping()
        log.info("LiteLLM loaded in %.1f s", time.perf_counter() - started)
    except Exception:  # a job that needs it meets the same error, with its own report
        log.exception("LiteLLM could not be loaded")


async def close_litellm_clients() -> None:
    """Close LiteLLM's HTTP clients, if it was loaded at all."""
    module = sys.modules.get("actors.adapters.llm.chat")
    if module is not None and not getattr(module.__spec__, "_initializing", False):
        await module.close_clients()


@functools.lru_cache(maxsize=1024)
def _native_params(provider: str, params: bytes) -> bytes:
    return encode(native_params(provider, msgspec.json.decode(params)))


def request_body(route: Route, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> bytes:
    asked = encode(dict(sorted(params.items())))
    mapped = (_native_params(route.provider, asked) if route.mapped_here
              else litellm_side().mapped_params(route.model, route.provider, asked))
    rest = encode({"model": route.model, "messages": messages})
    # Two JSON objects spliced into one (the mapping never holds model or messages).
    return mapped[:-1] + b"," + rest[1:] if len(mapped) > 2 else rest


async def _status_error(route: Route, status: int, headers: dict[str, str],
                        body_bytes: bytes) -> TransientError | PermanentError:
    """A non-200 answer, classified the way LiteLLM does for this vendor."""
    side = await litellm_side_async()
    return side.status_error(route, status, headers, body_bytes)


class OpenAIWireChat:
    """The provider port: native OpenAI-wire streaming where possible, LiteLLM otherwise."""

    def __init__(self, *, request_timeout_s: float = 600.0, connect_timeout_s: float = 10.0,
                 litellm_chat: LiteLLMChat | None = None) -> None:
        self._request_timeout_s = request_timeout_s
        self._http = http1.Client(connect_timeout_s=connect_timeout_s)
        self._litellm = litellm_chat  # made when a model first needs it

    async def aclose(self) -> None:
        await self._http.aclose()

    async def stream(self, *, model: str, api_base: str | None, api_key_env: str | None,
                     messages: list[dict[str, str]], params: Mapping[str, Any],
                     out: trio.MemorySendChannel[ProviderChunk], stream_path: str = "auto",
                     resend: Callable[[str], Awaitable[bool]] | None = None) -> None:
        """Stream one completion into `out`; raise TransientError / PermanentError."""
        route = None if stream_path == "litellm" else native_route(model, api_base, api_key_env)
        if route is None and stream_path != "litellm":
            side = await litellm_side_async()
            route = side.route(model, api_base, api_key_env, stream_path)
        if route is None:
            if self._litellm is None:
                side = await litellm_side_async()
                self._litellm = side.LiteLLMChat(request_timeout_s=self._request_timeout_s)
            await self._litellm.stream(model=model, api_base=api_base, api_key_env=api_key_env,
                                       messages=messages, params=params, out=out)
            return
        key = secret(route.api_key_env)
        headers = {"content-type": "application/json", "accept": "text/event-stream",
                   "user-agent": "chat-actors",
                   # Our own OpenAI-compatible servers take any key, as in LiteLLMChat.
                   "authorization": f"Bearer {key or 'not-needed'}"}
        body = request_body(route, messages, params)
        with out:
            try:
                with trio.fail_after(self._request_timeout_s):
                    async with self._http.stream_post(route.url, headers, body,
                                                      resend=resend) as response:
                        if response.status != 200:
                            error = await _status_error(route, response.status, response.headers,
                                                        await response.read(ERROR_BODY_LIMIT))
                            raise refused_prefill(error, messages)
                        await _read_events(response.pieces(), out, route)
            except trio.TooSlowError as exc:
                raise TransientError(f"{route.provider}: no answer within "
                                     f"{self._request_timeout_s:g} s", kind="timeout") from exc
            except ssl.SSLCertVerificationError as exc:
                raise PermanentError(f"{route.provider}: TLS certificate refused: {exc}",
                                     code="tls") from exc
            except http1.ProtocolError as exc:  # retried like a dropped stream
                raise TransientError(f"{route.provider}: broken HTTP from {route.url}: {exc}",
                                     kind="protocol") from exc
            except (http1.ConnectionLost, OSError) as exc:
                raise TransientError(f"{route.provider}: connection failed ({type(exc).__name__}: "
                                     f"{exc})", kind="connection") from exc


async def _read_events(body: AsyncGenerator[bytes], out: trio.MemorySendChannel[ProviderChunk],
                       route: Route) -> None:
    """Parse SSE `data:` lines; send each network read's text as one delta per run of
    reasoning or answer text."""
    stream = _StreamState(model=route.model)
    line = _PartialLine(route)
    async with contextlib.aclosing(body) as pieces:
        async for piece in pieces:
            lines = line.complete(piece)
            if lines:
                for delta in stream.parse(lines, route):
                    await _put(out, delta)
    if stream.finish_reason is None:
        raise TransientError(f"{route.provider}: the stream ended before the answer finished",
                             kind="protocol")
    usage = stream.usage or _Usage()
    cached, written, reasoning = usage.parts()
    await _put(out, StreamFinished(finish_reason=stream.finish_reason,
                                   prompt_tokens=usage.prompt_tokens,
                                   completion_tokens=usage.completion_tokens, model=stream.model,
                                   cached_tokens=cached, cache_write_tokens=written,
                                   reasoning_tokens=reasoning))


class _PartialLine:
    """The SSE lines each read completes. A line that spans reads is joined once, when
    its end comes (linear however many reads it takes), within MAX_SSE_LINE."""

    def __init__(self, route: Route) -> None:
        self._route = route
        self._parts: list[bytes] = []
        self._size = 0

    def complete(self, piece: bytes) -> list[bytes]:
        end = piece.rfind(b"\n")
        if end < 0:
            self._hold(piece)
            return []
        head, tail = piece[:end], piece[end + 1:]
        if self._parts:
            head = b"".join([*self._parts, head])
            self._parts.clear()
            self._size = 0
        if tail:
            self._hold(tail)
        return head.split(b"\n")

    def _hold(self, part: bytes) -> None:
        self._parts.append(part)
        self._size += len(part)
        if self._size > MAX_SSE_LINE:
            raise TransientError(f"{self._route.provider}: an SSE line longer than "
                                 f"{MAX_SSE_LINE} bytes", kind="protocol")


@dataclass
class _StreamState:
    model: str
    finish_reason: str | None = None
    usage: _Usage | None = None  # the last block that counted the prompt

    def parse(self, lines: list[bytes],
              route: Route) -> list[TokenDelta | ReasoningDelta | ToolCallDelta]:
        """The text of these SSE lines, reasoning and answer apart and in order, each run
        of one kind as one delta, and each tool call piece; usage, model and finish
        reason are kept."""
        runs: list[TokenDelta | ReasoningDelta | ToolCallDelta] = []
        kind: type[TokenDelta] | type[ReasoningDelta] = TokenDelta
        texts: list[str] = []

        def flush() -> None:  # the run of text so far, as one delta
            if texts:
                runs.append(kind(text="".join(texts)))
                texts.clear()

        def add(of: type[TokenDelta] | type[ReasoningDelta], text: str) -> None:
            nonlocal kind
            if of is not kind:
                flush()
            kind = of
            texts.append(text)

        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, `event:` / `id:` fields
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            try:
                chunk = _decode_chunk(data)
            except msgspec.DecodeError as exc:
                raise TransientError(f"{route.provider}: malformed stream chunk ({exc})",
                                     kind="protocol") from exc
            if chunk.error is not None:
                message = chunk.error.get("message", chunk.error)
                raise TransientError(f"{route.provider}: error mid-stream: {message}",
                                     kind="server_error")
            if chunk.usage is not None and chunk.usage.prompt_tokens is not None:
                self.usage = chunk.usage
            self.model = chunk.model or self.model
            for choice in chunk.choices:
                delta = choice.delta
                if delta is not None:
                    thought = delta.reasoning_content or delta.reasoning
                    if thought:
                        add(ReasoningDelta, thought)
                    if delta.content:
                        add(TokenDelta, delta.content)
                    for part in delta.tool_calls or ():
                        flush()  # the text before it comes first
                        function = part.function or _Function()
                        runs.append(ToolCallDelta(index=part.index, id=part.id or None,
                                                  name=function.name or None,
                                                  arguments=function.arguments or ""))
                if choice.finish_reason:
                    self.finish_reason = choice.finish_reason
        flush()
        return runs


async def _put(out: trio.MemorySendChannel[ProviderChunk], item: ProviderChunk) -> None:
    # No checkpoint while the mailbox has room: the reader keeps decoding what the
    # socket already delivered, and the provider takes it all in one go.
    try:
        out.send_nowait(item)
    except trio.WouldBlock:
        await out.send(item)
