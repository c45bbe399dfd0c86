"""spend: a job's tokens and dollars, as values.

`Spend` is usage with its cost; adding to it returns a new one. Contract 3's rule
holds throughout: `cached` and `cache_write` are parts of `prompt`, `reasoning` part
of `completion`; a cost of None is a price nobody knows, and stays unknown in any sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.ports import Pricing
from config import ModelAlias
from messages.ports import Rates, TokenCounts

MAX_COUNTED_TOKENS = 100_000_000  # one try's tokens, as a vendor may report them

NOTHING = TokenCounts(prompt=0, completion=0)


@dataclass(frozen=True, slots=True)
class Spend:
    """Usage summed over tries or attempts, and what it cost (None: at an unknown price)."""

    used: TokenCounts = field(default=NOTHING)
    cost_usd: float | None = 0.0

    def plus(self, used: TokenCounts, cost_usd: float | None) -> Spend:
        """This spend and one more try's usage, priced already."""
        return Spend(used=TokenCounts(
            prompt=self.used.prompt + used.prompt,
            completion=self.used.completion + used.completion,
            cached=self.used.cached + used.cached,
            cache_write=self.used.cache_write + used.cache_write,
            reasoning=self.used.reasoning + used.reasoning),
            cost_usd=None if cost_usd is None or self.cost_usd is None
            else self.cost_usd + cost_usd)

    def billed(self, pricing: Pricing, spec: ModelAlias, used: TokenCounts) -> Spend:
        """This spend and one more try on `spec`, each part at its own rate."""
        return self.plus(used, priced(pricing, spec, used))


def within(tokens: int) -> int:
    """A count as a row can hold it (a negative or absurd count, from a vendor or read
    back from a stream, must not stop the terminal write)."""
    return min(max(tokens, 0), MAX_COUNTED_TOKENS)


def rates(spec: ModelAlias) -> Rates:
    """The alias's own prices (config), each None where LiteLLM's map decides."""
    return Rates(input=spec.input_cost_per_token, output=spec.output_cost_per_token,
                 cache_read=spec.cache_read_cost_per_token,
                 cache_write=spec.cache_write_cost_per_token)


def priced(pricing: Pricing, spec: ModelAlias, used: TokenCounts) -> float | None:
    """What `used` cost on `spec`: a model we serve ourselves that nobody prices is free."""
    cost = pricing.cost_usd(spec.model, used, rates(spec))
    if cost is None and spec.api_base:
        return 0.0
    return cost


def worst_try_usd(pricing: Pricing, spec: ModelAlias, prompt_tokens: int,
                  answer_tokens: int) -> float:
    """The most one try on `spec` can cost (0 for a model without a price): the prompt
    at the dearer of the input and cache-write prices (a vendor may cache all of it)."""
    prices = rates(spec)
    return max(pricing.cost_usd(spec.model, TokenCounts(prompt=prompt_tokens,
                                                        completion=answer_tokens,
                                                        cache_write=written), prices) or 0.0
               for written in (0, prompt_tokens))
