"""LiteLLM, behind the trio-asyncio bridge: one crossing per stream, not per chunk.

The asyncio side reads LiteLLM's stream and turns each chunk into our own
`TokenDelta` / `StreamFinished`, which it hands to a Trio memory channel with
`send_nowait` (legal here: trio-asyncio runs asyncio callbacks inside Trio).
Only when that channel is full does it cross the bridge to wait.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import litellm
import trio

from actors.adapters import aio
from actors.errors import PermanentError, TransientError
from config import secret
from messages import mailboxes as chunks
from messages.mailboxes import ProviderChunk
from messages.ports import Capabilities

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


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int,
             input_price: float | None, output_price: float | None) -> float | None:
    """Price from config when set, else LiteLLM's bundled price map; None if unknown."""
    if input_price is not None or output_price is not None:
        return prompt_tokens * (input_price or 0.0) + completion_tokens * (output_price or 0.0)
    match _pricing(model):
        case (prompt_price, completion_price):
            return prompt_tokens * prompt_price + completion_tokens * completion_price
        case "unpriced":
            return None
    prompt_cost, completion_cost = litellm.cost_per_token(
        model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    return float(prompt_cost) + float(completion_cost)


_VARIABLE = ("peak", "tier", "_above_", "per_character", "per_second")


@functools.lru_cache(maxsize=256)
def _pricing(model: str) -> tuple[float, float] | str:
    """How LiteLLM prices `model`: (input, output) USD per token when its price is
    flat, "unpriced", or "litellm" (tiered, cache-aware, per character...: asked per job).

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
    # Prices that change with the hour (off-peak), the size (tiers) or the unit.
    if any(value and any(mark in key for mark in _VARIABLE) for key, value in info.items()):
        return "litellm"
    if (unit_in, unit_out) != (info.get("input_cost_per_token"), info.get("output_cost_per_token")):
        return "litellm"
    for prompt, completion in ((1, 1), (1000, 50), (300_000, 2000), (2_000_000, 100_000)):
        expected = prompt * unit_in + completion * unit_out
        if abs(litellm_cost(prompt, completion) - expected) > 1e-9 * max(expected, 1e-9):
            return "litellm"
    return unit_in, unit_out


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
    finish_reason = "stop"
    prompt_tokens = completion_tokens = None
    model = request["model"]
    try:
        async for chunk in response:
            usage = getattr(chunk, "usage", None)
            if usage is not None and getattr(usage, "prompt_tokens", None) is not None:
                prompt_tokens = usage.prompt_tokens
                completion_tokens = usage.completion_tokens
            model = getattr(chunk, "model", None) or model
            for choice in chunk.choices:
                delta = choice.delta
                # LiteLLM's name for every vendor's reasoning (Anthropic's thinking too).
                thought = getattr(delta, "reasoning_content", None) if delta else None
                if thought:
                    await put(chunks.ReasoningDelta(text=thought))
                for block in (getattr(delta, "thinking_blocks", None) if delta else None) or ():
                    signature = block.get("signature") if isinstance(block, dict) else None
                    if signature:
                        await put(chunks.ReasoningSigned(signature=str(signature)))
                if delta is not None and delta.content:
                    await put(chunks.TokenDelta(text=delta.content))
                for part in (getattr(delta, "tool_calls", None) if delta else None) or ():
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
    await put(chunks.StreamFinished(finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                                    completion_tokens=completion_tokens, model=str(model)))


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
                raise translate(exc) from exc
            except trio.BrokenResourceError:
                raise  # the job stopped reading (trio.Cancelled is no Exception: never caught)
            except Exception as exc:
                # LiteLLM wraps vendor failures in many types; classify, never swallow.
                raise translate(exc) from exc


class LiteLLMPricing:
    """The Pricing port: LiteLLM's bundled price map and its vendor routing."""

    def cost_usd(self, model: str, prompt_tokens: int, completion_tokens: int,
                 input_price: float | None, output_price: float | None) -> float | None:
        return cost_usd(model, prompt_tokens, completion_tokens, input_price, output_price)

    def provider_of(self, model: str) -> str:
        return provider_of(model)

    def capabilities(self, model: str) -> Capabilities:
        return capabilities(model)


@functools.lru_cache(maxsize=256)
def capabilities(model: str) -> Capabilities:
    """What LiteLLM's bundled model map says the model takes (False when unknown)."""

    def says(check: Callable[..., bool]) -> bool:
        try:
            return bool(check(model=model))
        except Exception:  # an unknown model or provider: it says nothing
            return False

    return Capabilities(vision=says(litellm.supports_vision),
                        tools=says(litellm.supports_function_calling),
                        reasoning=says(litellm.supports_reasoning))
