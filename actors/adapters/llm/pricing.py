"""The Pricing port: a model actors.adapters.llm.model_map knows is answered there, without
LiteLLM; every other one by LiteLLM (actors.adapters.llm.chat), imported on first use, or
waited for while the worker's loader imports it."""

from __future__ import annotations

from actors.adapters.llm.model_map import NO_CAPABILITIES, flat_cost, overridden, unmapped
from messages.ports import Capabilities, Rates, TokenCounts


class ModelPricing:
    """The Pricing port (see the module's docstring)."""

    def cost_usd(self, model: str, used: TokenCounts, own: Rates) -> float | None:
        if unmapped(model) is not None:  # the map has no price: the alias's own, or none
            return flat_cost(None, own, used) if overridden(own) else None
        from actors.adapters.llm import chat

        return chat.cost_usd(model, used, own)

    def provider_of(self, model: str) -> str:
        known = unmapped(model)
        if known is not None:
            return known[0]
        from actors.adapters.llm import chat

        return chat.provider_of(model)

    def capabilities(self, model: str) -> Capabilities:
        if unmapped(model) is not None:
            return NO_CAPABILITIES
        from actors.adapters.llm import chat

        return chat.capabilities(model)
