"""The parts of the OpenAI-wire path that need LiteLLM's knowledge: routing a model
LiteLLM's map knows, mapping its parameters, classifying a vendor's error answer.

Importing this module imports LiteLLM (seconds of CPU). The worker does it in a
thread at start (openai_wire.load_litellm) and waits for it before it is ready only
when an alias needs it; a model actors.adapters.llm.model_map answers never does.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import httpx
import litellm
import msgspec
import openai
from litellm.litellm_core_utils.exception_mapping_utils import exception_type
from litellm.utils import get_optional_params

from actors.adapters.llm.chat import LiteLLMChat, translate
from actors.adapters.llm.model_map import NATIVE_PROVIDERS, OPENAI_API_BASE, Route, proxied
from actors.errors import PermanentError, TransientError

__all__ = ["LiteLLMChat", "mapped_params", "route", "status_error", "warm_error_mapping"]

encode = msgspec.json.Encoder().encode


@functools.lru_cache(maxsize=256)
def route(model: str, api_base: str | None, api_key_env: str | None, stream_path: str) -> Route | None:
    """The native route LiteLLM gives a model, or None when it must stream through
    LiteLLM."""
    try:
        name, provider, _, base = litellm.get_llm_provider(model, api_base=api_base)
    except Exception:  # unknown to LiteLLM: let its own call report it
        return None
    if provider not in NATIVE_PROVIDERS and stream_path != "openai":
        return None
    hosted_openai = provider == "openai" and not api_base
    base = api_base or base or (OPENAI_API_BASE if hosted_openai else None)
    if base is None or proxied(base):
        return None  # (behind a proxy: LiteLLM's client speaks it, ours does not)
    # OPENAI_API_KEY only ever goes to OpenAI itself, never to a configured api_base.
    return Route(url=base.rstrip("/") + "/chat/completions", model=name, provider=provider,
                 api_key_env=api_key_env or ("OPENAI_API_KEY" if hosted_openai else None))


@functools.lru_cache(maxsize=1024)
def mapped_params(model: str, provider: str, params: bytes) -> bytes:
    """LiteLLM's mapping of the parameters (JSON in, JSON out: tools and schemas are
    not hashable, and the result is only ever encoded again)."""
    mapped = get_optional_params(model=model, custom_llm_provider=provider, stream=True,
                                 stream_options={"include_usage": True},
                                 **msgspec.json.decode(params))
    mapped.update(mapped.pop("extra_body", None) or {})
    return encode(mapped)


def status_error(route: Route, status: int, headers: dict[str, str],
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
    Done at start (in the loader's thread), so a running worker's first vendor error
    does not stall the event loop, and every stream with it."""
    example = Route(url="http://127.0.0.1/v1/chat/completions", model="gpt-4o-mini",
                    provider="openai", api_key_env=None)
    status_error(example, 500, {}, b'{"error": {"message": "warming up"}}')
