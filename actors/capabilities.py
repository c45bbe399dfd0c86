"""capabilities: what each model alias takes besides text (contract 2.1, version 2).

An alias's flags come from LiteLLM's model map unless its config sets them (a model
we serve ourselves is unknown to the map). actors/aliases.py resolves them once per
worker, and checks a request against its alias and every fallback, since any of them
may end up answering it.
"""

from __future__ import annotations

from actors.ports import Pricing
from config import Config
from messages.ports import Capabilities


def capabilities_of(config: Config, pricing: Pricing, alias: str) -> Capabilities:
    spec = config.llm.models[alias]
    mapped = pricing.capabilities(spec.model)
    return Capabilities(
        vision=mapped.vision if spec.vision is None else spec.vision,
        tools=mapped.tools if spec.tools is None else spec.tools,
        reasoning=mapped.reasoning if spec.reasoning is None else spec.reasoning,
        # A model the map does not know, at an api_base, is one a team serves itself
        # (llama.cpp, vLLM, Ollama): those continue a trailing assistant turn.
        continues=spec.continues if spec.continues is not None else (
            mapped.continues if mapped.continues is not None else spec.api_base is not None))
