"""Token counting with tiktoken, offline.

LiteLLM ships the cl100k_base / o200k_base files; plain tiktoken would try to
download them. Point TIKTOKEN_CACHE_DIR at LiteLLM's folder without importing
LiteLLM (which costs a second), before tiktoken loads anything.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from functools import cache, lru_cache
from pathlib import Path


def _litellm_tokenizers_dir() -> Path:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("litellm is not installed; it carries the offline tiktoken files")
    return Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"


if "TIKTOKEN_CACHE_DIR" not in os.environ:
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_litellm_tokenizers_dir())

import tiktoken  # noqa: E402  (must follow the cache dir above)


@cache
def _encoding(name: str) -> tiktoken.Encoding:
    return tiktoken.get_encoding(name)


def encoding_for(model: str) -> str:
    """The tiktoken encoding that best approximates `model`'s tokenizer."""
    bare = model.rsplit("/", 1)[-1]
    if bare.startswith(("gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4")):
        return "o200k_base"
    return "cl100k_base"


class TokenCounter:
    """Counts tokens of text for one model; approximate for non-OpenAI models."""

    def __init__(self, model: str) -> None:
        encoding = _encoding(encoding_for(model))

        # The system prompt and the user's message are counted more than once per job.
        @lru_cache(maxsize=1024)
        def count(text: str) -> int:
            return len(encoding.encode(text, disallowed_special=()))

        self.count = count


class TiktokenCounting:
    """The TokenCounting port: one cached TokenCounter per model."""

    def __init__(self) -> None:
        self._counters: dict[str, TokenCounter] = {}

    def warm(self, models: Iterable[str]) -> None:
        """Load the encodings now (blocking, about a quarter of a second): loaded by the
        first job instead, they stall the event loop and every stream with it."""
        for model in models:
            self.counter(model)

    def counter(self, model: str) -> Callable[[str], int]:
        if model not in self._counters:
            self._counters[model] = TokenCounter(model)
        return self._counters[model].count
