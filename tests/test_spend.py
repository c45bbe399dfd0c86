"""actors/job/spend.py: a job's tokens and dollars as values (contract 3's rules)."""

from __future__ import annotations

import pytest

from actors.job.spend import MAX_COUNTED_TOKENS, Spend, within, worst_try_usd
from config import ModelAlias
from messages.ports import Rates, TokenCounts
from tests.fakes import FlatPricing


class Unpriced(FlatPricing):
    """A Pricing port that knows no price at all."""

    def cost_usd(self, model: str, used: TokenCounts, own: Rates) -> float | None:
        return None


def test_adding_returns_a_new_spend_with_every_part_summed():
    first = Spend().plus(TokenCounts(prompt=10, completion=4, cached=3, cache_write=2,
                                     reasoning=1), 0.5)
    both = first.plus(TokenCounts(prompt=7, completion=6, cached=1, reasoning=2), 0.25)
    assert first == Spend(used=TokenCounts(prompt=10, completion=4, cached=3, cache_write=2,
                                           reasoning=1), cost_usd=0.5)
    assert both == Spend(used=TokenCounts(prompt=17, completion=10, cached=4, cache_write=2,
                                          reasoning=3), cost_usd=0.75)


def test_an_unknown_price_stays_unknown_in_every_sum_after_it():
    spent = Spend().plus(TokenCounts(prompt=1, completion=1), None)
    assert spent.cost_usd is None
    assert spent.plus(TokenCounts(prompt=1, completion=1), 2.0).cost_usd is None
    assert spent.used == TokenCounts(prompt=1, completion=1)  # the tokens still count


def test_a_try_is_billed_at_the_aliases_own_rates_and_a_self_served_model_is_free():
    used = TokenCounts(prompt=100, completion=10)
    own = ModelAlias(model="acme/m", input_cost_per_token=0.01, output_cost_per_token=0.1)
    assert Spend().billed(FlatPricing(), own, used).cost_usd == pytest.approx(2.0)
    served = ModelAlias(model="local/m", api_base="http://127.0.0.1:9/v1")
    assert Spend().billed(Unpriced(), served, used).cost_usd == 0.0
    assert Spend().billed(Unpriced(), ModelAlias(model="acme/m"), used).cost_usd is None


def test_the_worst_try_prices_the_whole_prompt_at_the_dearer_of_input_and_cache_write():
    class CacheDear(FlatPricing):
        def cost_usd(self, model: str, used: TokenCounts, own: Rates) -> float | None:
            return (used.prompt - used.cache_write) * 1.0 + used.cache_write * 3.0 \
                + used.completion * 2.0

    assert worst_try_usd(CacheDear(), ModelAlias(model="acme/m"), 10, 5) == 3.0 * 10 + 2.0 * 5
    assert worst_try_usd(Unpriced(), ModelAlias(model="acme/m"), 10, 5) == 0.0


@pytest.mark.parametrize(("reported", "kept"), [(-5, 0), (42, 42), (10**12, MAX_COUNTED_TOKENS)])
def test_a_count_is_kept_within_what_a_row_holds(reported: int, kept: int):
    assert within(reported) == kept
