"""LiteLLM, behind the trio-asyncio bridge: one crossing per stream, not per chunk.

The asyncio side reads LiteLLM's stream and turns each chunk into our own
`TokenDelta` / `StreamFinished`, which it hands to a Trio memory channel with
`send_nowait` (legal here: trio-asyncio runs asyncio callbacks inside Trio).
Only when that channel is full does it cross the bridge to wait.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import litellm
import trio
from litellm.llms.custom_httpx.async_client_cleanup import close_litellm_async_clients

from actors.adapters import aio
from actors.adapters.llm.model_map import MapRates, flat_cost, overridden
from actors.adapters.llm.prefill import refused_prefill
from actors.errors import PermanentError, TransientError
from config import secret
from messages import mailboxes as chunks
from messages.mailboxes import ProviderChunk
from messages.ports import Capabilities, Rates, TokenCounts

log = logging.getLogger("chat_actors.llm")

litellm.suppress_debug_info = True
litellm.drop_params = True  # a vendor that lacks a param must not fail the job

_TRANSIENT = (
    litellm.exceptions.RateLimitError,
    litellm.exceptions.APIConnectionError,
    litellm.exceptions.Timeout,
    litellm.exceptions.InternalServerError,
    litellm.exceptions.ServiceUnavailableError,
    litellm.exceptions.BadGatewayError,
)
_PERMANENT = {
    litellm.exceptions.ContextWindowExceededError: "context_length",
    litellm.exceptions.AuthenticationError: "auth",
    litellm.exceptions.PermissionDeniedError: "auth",
    litellm.exceptions.NotFoundError: "model_not_found",
    litellm.exceptions.BadRequestError: "bad_request",
    litellm.exceptions.UnprocessableEntityError: "bad_request",
}


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        value = headers.get("retry-after")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def translate(exc: BaseException) -> TransientError | PermanentError:
    """Map a LiteLLM/httpx failure to ours. The message never carries the API key."""
    text = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
    for kind, code in _PERMANENT.items():  # ContextWindowExceeded is a BadRequest: check first
        if isinstance(exc, kind):
            return PermanentError(text, code=code)
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and status < 200:  # a 101 to a POST: broken HTTP, not an answer
        return TransientError(text, kind="protocol")
    if isinstance(exc, _TRANSIENT) or (isinstance(status, int) and (status == 429 or status >= 500)):
        return TransientError(text, retry_after=_retry_after(exc), kind=_kind(exc, status))
    return PermanentError(text, code="provider_error")


def _kind(exc: BaseException, status: object) -> str:
    if isinstance(exc, litellm.exceptions.RateLimitError) or status == 429:
        return "rate_limit"
    if isinstance(exc, litellm.exceptions.Timeout):
        return "timeout"
    if isinstance(exc, litellm.exceptions.APIConnectionError):
        return "connection"
    return "server_error"


def cost_usd(model: str, used: TokenCounts, own: Rates) -> float | None:
    """contract 3: uncached prompt x input + cached x cache read + cache writes x cache
    write + completion x output (reasoning at its own price where the map has one).
    Each rate is the alias's own when set, else LiteLLM's bundled map; a cache rate
    neither gives is the input rate. None: nobody prices the model."""
    pricing = _pricing(model)
    own_rates = overridden(own)
    if pricing == "litellm" and not own_rates:
        return _litellm_cost(model, used)
    base = (pricing if isinstance(pricing, MapRates)
            else _base_rates(model) if pricing == "litellm" else None)
    if base is None and not own_rates:
        return None
    return flat_cost(base, own, used)


def _litellm_cost(model: str, used: TokenCounts) -> float:
    """LiteLLM's own pricing (tiers, hours, units), given the parts of the usage."""
    usage = litellm.Usage(
        prompt_tokens=used.prompt, completion_tokens=used.completion,
        total_tokens=used.prompt + used.completion,
        cache_read_input_tokens=used.cached, cache_creation_input_tokens=used.cache_write,
        completion_tokens_details={"reasoning_tokens": used.reasoning} if used.reasoning
        else None)
    return float(sum(litellm.cost_per_token(model=model, usage_object=usage)))


# Prices that change with the hour (off-peak), the size (tiers) or the unit; the
# 1-hour cache-write price is a kind of write we never ask for, not a tier.
_VARIABLE = ("peak", "tier", "_above_", "per_character", "per_second")
_NOT_VARIABLE = ("_above_1hr",)


def _variable(key: str) -> bool:
    return any(mark in key for mark in _VARIABLE) and not key.endswith(_NOT_VARIABLE)


def _map_rates(info: Mapping[str, Any]) -> MapRates | None:
    unit_in, unit_out = info.get("input_cost_per_token"), info.get("output_cost_per_token")
    if not isinstance(unit_in, int | float) or not isinstance(unit_out, int | float):
        return None

    def rate(key: str) -> float | None:
        value = info.get(key)
        return float(value) if isinstance(value, int | float) else None

    return MapRates(input=float(unit_in), output=float(unit_out),
                     cache_read=rate("cache_read_input_token_cost"),
                     cache_write=rate("cache_creation_input_token_cost"),
                     reasoning=rate("output_cost_per_reasoning_token"))


@functools.lru_cache(maxsize=256)
def _base_rates(model: str) -> MapRates | None:
    """The map's base prices (below any tier), for an alias that sets some of its own."""
    try:
        return _map_rates(litellm.get_model_info(model))
    except Exception:  # unknown to the map
        return None


@functools.lru_cache(maxsize=256)
def _pricing(model: str) -> MapRates | str:
    """How LiteLLM prices `model`: its rates when they are flat, "unpriced", or
    "litellm" (tiered, by the hour, per character...: asked per job).

    litellm.cost_per_token costs ~1 ms a call (as much again to raise for an unpriced
    model). Flat means LiteLLM's own answers at small and large counts are exactly
    the per-token prices times the counts; then that sum is done here."""
    def litellm_cost(prompt: int, completion: int) -> float:
        return sum(litellm.cost_per_token(model=model, prompt_tokens=prompt,
                                          completion_tokens=completion))

    try:
        unit_in, unit_out = litellm_cost(1_000_000, 0) / 1e6, litellm_cost(0, 1_000_000) / 1e6
    except Exception:  # LiteLLM raises bare Exception for an unpriced model
        return "unpriced"
    try:
        info = litellm.get_model_info(model)
    except Exception:
        return "litellm"
    if any(value and _variable(key) for key, value in info.items()):
        return "litellm"
    rates = _map_rates(info)
    if rates is None or (unit_in, unit_out) != (rates.input, rates.output):
        return "litellm"
    for prompt, completion in ((1, 1), (1000, 50), (300_000, 2000), (2_000_000, 100_000)):
        expected = prompt * unit_in + completion * unit_out
        if abs(litellm_cost(prompt, completion) - expected) > 1e-9 * max(expected, 1e-9):
            return "litellm"
    # Cached, cache-write and reasoning parts at the map's rates, as LiteLLM itself
    # charges them (some vendors' calculators discount cache reads the map omits).
    parts = TokenCounts(prompt=1000, completion=50, cached=400, cache_write=100, reasoning=20)
    expected = flat_cost(rates, Rates(), parts)
    try:
        if abs(_litellm_cost(model, parts) - expected) > 1e-9 * max(expected, 1e-9):
            return "litellm"
    except Exception:
        return "litellm"
    return rates


@functools.lru_cache(maxsize=256)
def provider_of(model: str) -> str:
    try:
        return litellm.get_llm_provider(model)[1]
    except Exception:  # unknown prefix: the part before the slash is the best name we have
        return model.split("/", 1)[0] if "/" in model else "unknown"


async def _pump(request: Mapping[str, Any], out: trio.MemorySendChannel[ProviderChunk]) -> None:
    # Runs on the asyncio side of the bridge.
    async def put(item: ProviderChunk) -> None:
        try:
            out.send_nowait(item)
        except trio.WouldBlock:
            await aio.to_trio(out.send, item)

    response: Any = await litellm.acompletion(**request)  # a stream: CustomStreamWrapper
    finish_reason: str | None = None
    usage: Any = None
    model = request["model"]
    said = False  # the vendor sent any text, reasoning or tool call
    try:
        async for chunk in response:
            counted = getattr(chunk, "usage", None)
            if counted is not None and getattr(counted, "prompt_tokens", None) is not None:
                usage = counted
            model = getattr(chunk, "model", None) or model
            for choice in chunk.choices:
                delta = choice.delta
                # LiteLLM's name for every vendor's reasoning (Anthropic's thinking too).
                thought = getattr(delta, "reasoning_content", None) if delta else None
                if thought:
                    await put(chunks.ReasoningDelta(text=thought))
                for block in (getattr(delta, "thinking_blocks", None) if delta else None) or ():
                    if (piece := _thinking_piece(block)) is not None:
                        await put(piece)
                if delta is not None and delta.content:
                    await put(chunks.TokenDelta(text=delta.content))
                said = said or bool(thought or (delta is not None and delta.content))
                for part in (getattr(delta, "tool_calls", None) if delta else None) or ():
                    said = True
                    function = getattr(part, "function", None)
                    await put(chunks.ToolCallDelta(
                        index=int(getattr(part, "index", 0) or 0),
                        id=getattr(part, "id", None) or None,
                        name=getattr(function, "name", None) or None,
                        arguments=getattr(function, "arguments", None) or ""))
                if choice.finish_reason:
                    finish_reason = choice.finish_reason
    finally:
        close = getattr(response, "aclose", None)
        if close is not None:
            await close()
    if finish_reason is None or not (said or usage is not None):
        # LiteLLM says so itself only for some streams, and makes up a `stop` for a
        # body it could not read at all (say gzip the vendor sent unasked): a stream
        # that said nothing, not even its usage, is no answer (an empty answer of a
        # real vendor still reports its usage).
        raise TransientError(f"{model}: the stream ended before the answer finished",
                             kind="protocol")
    await put(_finished(finish_reason, usage, str(model)))


def _thinking_piece(block: object) -> chunks.ThinkingPiece | None:
    """One of LiteLLM's streamed thinking blocks (Anthropic's, numbered by `index`):
    a thinking text piece, its signature, or a whole redacted block."""
    if not isinstance(block, dict):
        return None
    fields = cast("dict[str, object]", block)
    index = fields.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool):
        return None
    match fields.get("type"):
        case "redacted_thinking":
            data = fields.get("data")
            return chunks.ThinkingPiece(index=index, kind="redacted_thinking",
                                        data=data) if isinstance(data, str) and data else None
        case "thinking":
            thinking, signature = fields.get("thinking") or "", fields.get("signature") or ""
            if not isinstance(thinking, str) or not isinstance(signature, str):
                return None
            return chunks.ThinkingPiece(index=index, kind="thinking", thinking=thinking,
                                        signature=signature) if thinking or signature else None
        case _:
            return None


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _finished(finish_reason: str, usage: Any, model: str) -> chunks.StreamFinished:
    """The end of the stream, its usage under contract 3's rule. LiteLLM already counts
    every vendor's prompt with its cached parts in `prompt_tokens` (Anthropic's
    input_tokens leave them out; LiteLLM adds them) and the reasoning in
    `completion_tokens`; the parts are in its details."""
    if usage is None:
        return chunks.StreamFinished(finish_reason=finish_reason, prompt_tokens=None,
                                     completion_tokens=None, model=model)
    prompt = getattr(usage, "prompt_tokens_details", None)
    completion = getattr(usage, "completion_tokens_details", None)
    return chunks.StreamFinished(
        finish_reason=finish_reason, prompt_tokens=_count(usage.prompt_tokens),
        completion_tokens=_count(getattr(usage, "completion_tokens", 0)), model=model,
        cached_tokens=_count(getattr(prompt, "cached_tokens", None))
        or _count(getattr(usage, "cache_read_input_tokens", None)),
        cache_write_tokens=_count(getattr(usage, "cache_creation_input_tokens", None))
        or _count(getattr(prompt, "cache_write_tokens", None)),
        reasoning_tokens=_count(getattr(completion, "reasoning_tokens", None)))


async def close_clients() -> None:
    """Close LiteLLM's cached HTTP clients (asyncio side): their keep-alive sockets
    belong to this loop, and a later loop (a worker started again in one process)
    must get fresh ones. Closing is best effort: nothing it raises stops a shutdown."""
    try:
        await close_litellm_async_clients()
    except Exception as exc:
        log.warning("closing LiteLLM's HTTP clients failed: %s", exc)
    litellm.in_memory_llm_clients_cache.flush_cache()
    # The module-level client (Anthropic's path) is one of those, also kept as a module
    # attribute that LiteLLM makes on first use: forget it so the next use makes anew.
    if "module_level_aclient" in vars(litellm):
        delattr(litellm, "module_level_aclient")


class LiteLLMChat:
    """The provider port over LiteLLM. Secrets are read from the environment per call."""

    def __init__(self, *, request_timeout_s: float = 600.0) -> None:
        self._request_timeout_s = request_timeout_s

    async def stream(
        self,
        *,
        model: str,
        api_base: str | None,
        api_key_env: str | None,
        messages: list[dict[str, str]],
        params: Mapping[str, Any],
        out: trio.MemorySendChannel[ProviderChunk],
        stream_path: str = "litellm",
        resend: Callable[[str], Awaitable[bool]] | None = None,  # LiteLLM never resends
    ) -> None:
        """Stream one completion into `out`; raise TransientError / PermanentError."""
        request: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "num_retries": 0,  # retries and fallbacks are ours, not LiteLLM's
            "timeout": self._request_timeout_s,
            **params,
        }
        if api_base:
            request["api_base"] = api_base
        key = secret(api_key_env)
        if key:
            request["api_key"] = key
        elif api_base and model.startswith("openai/"):
            # An OpenAI-compatible server of our own (llama.cpp, vLLM) takes any key,
            # but the SDK refuses to send a request without one.
            request["api_key"] = "not-needed"
        with out:
            try:
                await aio.run_asyncio(_pump, request, out)
            except (TransientError, PermanentError):
                raise
            except (litellm.exceptions.APIError, litellm.exceptions.OpenAIError,
                    OSError) as exc:
                raise refused_prefill(translate(exc), messages) from exc
            except trio.BrokenResourceError:
                raise  # the job stopped reading (trio.Cancelled is no Exception: never caught)
            except Exception as exc:
                # LiteLLM wraps vendor failures in many types; classify, never swallow.
                raise refused_prefill(translate(exc), messages) from exc


@functools.lru_cache(maxsize=256)
def capabilities(model: str) -> Capabilities:
    """What LiteLLM's bundled model map says the model takes (False when unknown)."""

    def says(check: Callable[..., bool]) -> bool:
        try:
            return bool(check(model=model))
        except Exception:  # an unknown model or provider: it says nothing
            return False

    def continues() -> bool | None:
        """The map's word on continuing a trailing assistant turn (prefill); None when
        the map does not know the model."""
        try:
            litellm.get_model_info(model=model)
        except Exception:
            return None
        return says(functools.partial(litellm.utils.supports_factory, custom_llm_provider=None,
                            key="supports_assistant_prefill"))

    return Capabilities(vision=says(litellm.supports_vision),
                        tools=says(litellm.supports_function_calling),
                        reasoning=says(litellm.supports_reasoning), continues=continues())
