"""What a worker knows of a model without importing LiteLLM.

Importing LiteLLM costs seconds of CPU (6.9 s measured on the benchmark VM on a slow
day, about 3 s on a fast one): most of a worker's cold start. A model that LiteLLM's
bundled map does not know, served over the OpenAI wire format (`openai/`,
`hosted_vllm/`, `lm_studio/`, `llamafile/`, `litellm_proxy/` with an `api_base`: the
model a team serves itself), needs none of LiteLLM's knowledge: LiteLLM routes it to
that `api_base`, passes every parameter we send through unchanged (but for the few in
_DROPPED), has no price for it and says it takes nothing besides text. This module
answers those from the map file alone, read as data; `tests/test_model_map.py`
checks each answer equals LiteLLM's own. Every other model is LiteLLM's to answer
(actors.adapters.llm.chat, imported on first use).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from messages.ports import Capabilities, Rates, TokenCounts

# LiteLLM providers whose chat endpoint is the plain OpenAI wire format, with no
# request or response rewriting beyond the parameter mapping.
NATIVE_PROVIDERS = frozenset({"openai", "hosted_vllm", "lm_studio", "llamafile", "litellm_proxy"})
# What LiteLLM drops (drop_params) for a model its map does not know, by provider.
_DROPPED: Mapping[str, frozenset[str]] = {"lm_studio": frozenset({"reasoning_effort"}),
                                          "llamafile": frozenset({"reasoning_effort"})}
# Names LiteLLM maps differently once it knows them (o-series, GPT-5 reasoning models):
# never answered here, whatever the map says.
_REASONING_NAME = re.compile(r"(^|[/_.:-])(o[1-9]|gpt-?5)", re.IGNORECASE)
MAP_FILE = "model_prices_and_context_window_backup.json"
OPENAI_API_BASE = "https://api.openai.com/v1"
NO_CAPABILITIES = Capabilities(vision=False, tools=False, reasoning=False)


@dataclass(frozen=True)
class Route:
    """Where and how one configured model is called natively."""

    url: str
    model: str  # the vendor's name for it, without LiteLLM's provider prefix
    provider: str
    api_key_env: str | None
    mapped_here: bool = False  # parameters mapped by model_map, not LiteLLM


def proxied(url: str) -> bool:
    """Whether the environment sends `url` through an HTTP proxy (LiteLLM's client speaks
    it; our own does not)."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    return bool(proxies.get(parts.scheme) or proxies.get("all")) and \
        not urllib.request.proxy_bypass(parts.hostname or "")


@functools.cache
def _map_keys() -> frozenset[str]:
    """The model names in LiteLLM's bundled map, read as data (finding the package
    does not import it)."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("litellm is not installed; its bundled model map is needed")
    path = Path(next(iter(spec.submodule_search_locations))) / MAP_FILE
    return frozenset(msgspec.json.decode(path.read_bytes(), type=dict[str, msgspec.Raw]))


@functools.lru_cache(maxsize=256)
def unmapped(model: str) -> tuple[str, str] | None:
    """(provider, name) for a model on an OpenAI-wire provider that LiteLLM's map does
    not know; None when LiteLLM must answer for it."""
    provider, slash, name = model.partition("/")
    if not slash or provider not in NATIVE_PROVIDERS or not name.strip():
        return None
    if _REASONING_NAME.search(name):
        return None
    keys = _map_keys()
    if any(key in keys for key in (model, name, name.lower(), f"{provider}/{name.lower()}")):
        return None
    return provider, name


def native_params(provider: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The request parameters LiteLLM would send to an unmapped model, streamed."""
    dropped = _DROPPED.get(provider, frozenset())
    return {**{k: v for k, v in params.items() if k not in dropped},
            "stream": True, "stream_options": {"include_usage": True}}


@dataclass(frozen=True)
class MapRates:
    """LiteLLM's flat prices for a model, USD per token (None: the map has none)."""

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None
    reasoning: float | None = None


def overridden(own: Rates) -> bool:
    return any(rate is not None for rate in (own.input, own.output, own.cache_read,
                                             own.cache_write))


def flat_cost(base: MapRates | None, own: Rates, used: TokenCounts) -> float:
    """contract 3 at flat rates: the alias's own where set, else the map's; a cache rate
    neither gives is the input rate."""
    input_rate = _first(own.input, base and base.input, 0.0)
    output_rate = _first(own.output, base and base.output, 0.0)
    read_rate = _first(own.cache_read, base and base.cache_read, input_rate)
    write_rate = _first(own.cache_write, base and base.cache_write, input_rate)
    reasoning_rate = _first(base and base.reasoning if own.output is None else None,
                            output_rate)
    uncached = used.prompt - used.cached - used.cache_write
    return (uncached * input_rate + used.cached * read_rate + used.cache_write * write_rate
            + (used.completion - used.reasoning) * output_rate
            + used.reasoning * reasoning_rate)


def _first(*rates: float | None) -> float:
    return next(rate for rate in rates if rate is not None)
