"""The OpenAI wire format, streamed natively under Trio; LiteLLM for everything else.

LiteLLM builds a pydantic object for every streamed chunk and runs behind the
trio-asyncio bridge: 256-400 us of CPU per chunk, measured. For vendors that
speak the OpenAI chat-completions wire format, this adapter posts the request
directly from Trio (actors.adapters.http1) and decodes each SSE `data:` line
with msgspec into the three fields we use: a few microseconds per chunk. LiteLLM still does the parts that
need its knowledge: it resolves the model to a vendor and its endpoint, maps
the request parameters for that model (`max_completion_tokens` for reasoning
models, dropping what a model refuses), classifies vendor errors, and prices
the usage (llm.cost_usd). Every other vendor (Anthropic, Bedrock, Vertex, ...)
streams through LiteLLM as before. `llm.models.<alias>.stream_path` forces
either path.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
import urllib.request
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, cast
from urllib.parse import urlsplit

import httpx
import litellm
import msgspec
import openai
import trio
from litellm.litellm_core_utils.exception_mapping_utils import exception_type
from litellm.utils import get_optional_params
from msgspec import Meta

from actors.adapters import http1
from actors.adapters.llm import LiteLLMChat, translate
from actors.errors import PermanentError, TransientError
from config import secret
from messages.mailboxes import (
    ProviderChunk,
    ReasoningDelta,
    StreamFinished,
    TokenDelta,
    ToolCallDelta,
)

# LiteLLM providers whose chat endpoint is the plain OpenAI wire format, with no
# request or response rewriting beyond the parameter mapping done here.
NATIVE_PROVIDERS = frozenset({"openai", "hosted_vllm", "lm_studio", "llamafile", "litellm_proxy"})
OPENAI_API_BASE = "https://api.openai.com/v1"
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
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Route:
    """Where and how one configured model is called natively."""

    url: str
    model: str  # the vendor's name for it, without LiteLLM's provider prefix
    provider: str
    api_key_env: str | None


@functools.lru_cache(maxsize=256)
def resolve(model: str, api_base: str | None, api_key_env: str | None, stream_path: str) -> Route | None:
    """The native route for a model, or None when it must go through LiteLLM."""
    if stream_path == "litellm":
        return None
    try:
        name, provider, _, base = litellm.get_llm_provider(model, api_base=api_base)
    except Exception:  # unknown to LiteLLM: let its own call report it
        return None
    if provider not in NATIVE_PROVIDERS and stream_path != "openai":
        return None
    hosted_openai = provider == "openai" and not api_base
    base = api_base or base or (OPENAI_API_BASE if hosted_openai else None)
    if base is None or _proxied(base):
        return None  # (behind a proxy: LiteLLM's client speaks it, ours does not)
    # OPENAI_API_KEY only ever goes to OpenAI itself, never to a configured api_base.
    return Route(url=base.rstrip("/") + "/chat/completions", model=name, provider=provider,
                 api_key_env=api_key_env or ("OPENAI_API_KEY" if hosted_openai else None))


def _proxied(url: str) -> bool:
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    return bool(proxies.get(parts.scheme) or proxies.get("all")) and \
        not urllib.request.proxy_bypass(parts.hostname or "")


@functools.lru_cache(maxsize=1024)
def _mapped_params(model: str, provider: str, params: bytes) -> bytes:
    """LiteLLM's mapping of the parameters (JSON in, JSON out: tools and schemas are
    not hashable, and the result is only ever encoded again)."""
    mapped = get_optional_params(model=model, custom_llm_provider=provider, stream=True,
                                 stream_options={"include_usage": True},
                                 **msgspec.json.decode(params))
    mapped.update(mapped.pop("extra_body", None) or {})
    return _encode(mapped)


def request_body(route: Route, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> bytes:
    mapped = _mapped_params(route.model, route.provider, _encode(dict(sorted(params.items()))))
    rest = _encode({"model": route.model, "messages": messages})
    # Two JSON objects spliced into one (the mapping never holds model or messages).
    return mapped[:-1] + b"," + rest[1:] if len(mapped) > 2 else rest


def _status_error(route: Route, status: int, headers: dict[str, str],
                  body_bytes: bytes) -> TransientError | PermanentError:
    """Classify a non-200 answer the way LiteLLM does for this vendor."""
    text = body_bytes.decode("utf-8", "replace")
    try:
        body: Any = msgspec.json.decode(body_bytes)
    except msgspec.DecodeError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    message = (error.get("message") if isinstance(error, dict) else None) or text or str(status)
    # The openai SDK's error type, as LiteLLM's mapping expects it.
    response = httpx.Response(status, headers=headers, content=body_bytes,
                              request=httpx.Request("POST", route.url))
    # openai 3.x annotates httpx2's Response; it reads only status, headers and body.
    vendor_error = openai.APIStatusError(str(message), response=cast(Any, response), body=body)
    try:
        exception_type(model=route.model, original_exception=vendor_error,
                       custom_llm_provider=route.provider)
    except Exception as mapped:
        return translate(mapped)
    return translate(vendor_error)


def warm_error_mapping() -> None:
    """LiteLLM's error mapping loads on its first use, about 0.3 s of blocking work.
    Done at start (in a thread), so a running worker's first vendor error does not
    stall the event loop, and every stream with it."""
    route = Route(url="http://127.0.0.1/v1/chat/completions", model="gpt-4o-mini",
                  provider="openai", api_key_env=None)
    _status_error(route, 500, {}, b'{"error": {"message": "warming up"}}')


class OpenAIWireChat:
    """The provider port: native OpenAI-wire streaming where possible, LiteLLM otherwise."""

    def __init__(self, *, request_timeout_s: float = 600.0, connect_timeout_s: float = 10.0,
                 litellm_chat: LiteLLMChat | None = None) -> None:
        self._request_timeout_s = request_timeout_s
        self._http = http1.Client(connect_timeout_s=connect_timeout_s)
        self._litellm = litellm_chat or LiteLLMChat(request_timeout_s=request_timeout_s)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def stream(self, *, model: str, api_base: str | None, api_key_env: str | None,
                     messages: list[dict[str, str]], params: Mapping[str, Any],
                     out: trio.MemorySendChannel[ProviderChunk], stream_path: str = "auto",
                     resend: Callable[[str], Awaitable[bool]] | None = None) -> None:
        """Stream one completion into `out`; raise TransientError / PermanentError."""
        route = resolve(model, api_base, api_key_env, stream_path)
        if route is None:
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
                            raise _status_error(route, response.status, response.headers,
                                                await response.read(ERROR_BODY_LIMIT))
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
