"""Exact cost (contract 3, contract v2): cached, cache-write and reasoning tokens are
parts of the prompt and completion counts, each priced at its own rate, whatever
the vendor's usage block looks like; the budget settles on that figure."""

from __future__ import annotations

import random
import uuid

import litellm
import pytest
import trio

from actors.adapters.llm.chat import cost_usd
from messages.ports import Rates, TokenCounts
from tests.helpers import events_of, job_row, produce, request, worker_running
from tests.scripted_llm import Reply
from tools.cli import main as cli

PARTS = TokenCounts(prompt=1200, completion=300, cached=600, cache_write=200, reasoning=100)


def test_the_parts_are_priced_as_litellm_prices_them_for_every_model_it_knows():
    """Our cached flat prices, with every part, against LiteLLM's own calculator given
    the same usage (its tiered and vendor-specific rules included)."""
    chat_models = sorted(m for m, info in litellm.model_cost.items()
                         if info.get("mode") == "chat" and m != "sample_spec"
                         and info.get("litellm_provider") not in ("github_copilot", "chatgpt"))
    checked = 0
    for model in random.Random(17).sample(chat_models, 300):
        for used in (PARTS, TokenCounts(prompt=250_000, completion=10, cached=90_000)):
            usage = litellm.Usage(prompt_tokens=used.prompt, completion_tokens=used.completion,
                                  total_tokens=used.prompt + used.completion,
                                  cache_read_input_tokens=used.cached,
                                  cache_creation_input_tokens=used.cache_write,
                                  completion_tokens_details={"reasoning_tokens": used.reasoning})
            try:
                expected = sum(litellm.cost_per_token(model=model, usage_object=usage))
            except Exception:
                continue
            assert cost_usd(model, used, Rates()) == pytest.approx(expected, rel=1e-9), model
            checked += 1
    assert checked > 300


def test_an_alias_overrides_each_rate_alone():
    """A negotiated cache-read price replaces only that rate; a cache rate nobody gives
    is the input rate; a model nobody prices costs None."""
    price = litellm.model_cost["claude-sonnet-4-5"]
    got = cost_usd("anthropic/claude-sonnet-4-5", PARTS, Rates(cache_read=1e-8))
    assert got == pytest.approx(
        400 * price["input_cost_per_token"] + 600 * 1e-8
        + 200 * price["cache_creation_input_token_cost"] + 300 * price["output_cost_per_token"])
    own = cost_usd("openai/our-own-model", PARTS, Rates(input=2e-6, output=5e-6))
    assert own == pytest.approx(1200 * 2e-6 + 300 * 5e-6)
    assert cost_usd("openai/our-own-model", PARTS, Rates()) is None


# Usage blocks as each vendor sends them (shapes recorded from their APIs).
OPENAI_USAGE = {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
                "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0}}
# Anthropic's input_tokens leave the cached tokens out.
ANTHROPIC_USAGE = {"input_tokens": 12, "cache_creation_input_tokens": 512,
                   "cache_read_input_tokens": 2048, "output_tokens": 87}
GEMINI_USAGE = {"promptTokenCount": 3000, "cachedContentTokenCount": 2000,
                "candidatesTokenCount": 200, "thoughtsTokenCount": 300, "totalTokenCount": 3500,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 3000}]}


def _hand_computed() -> dict[str, tuple[dict[str, int], float]]:
    """(final.usage, costUsd) of each block, from contract 3 and the price map by hand."""
    o4 = litellm.model_cost["o4-mini"]
    claude = litellm.model_cost["claude-sonnet-4-5"]
    gemini = litellm.model_cost["gemini/gemini-2.5-flash"]
    return {
        "gpt": ({"promptTokens": 2006, "completionTokens": 300, "totalTokens": 2306,
                 "cachedTokens": 1920, "reasoningTokens": 192},
                86 * o4["input_cost_per_token"] + 1920 * o4["cache_read_input_token_cost"]
                + 300 * o4["output_cost_per_token"]),
        "claude": ({"promptTokens": 2572, "completionTokens": 87, "totalTokens": 2659,
                    "cachedTokens": 2048, "cacheWriteTokens": 512},
                   12 * claude["input_cost_per_token"]
                   + 2048 * claude["cache_read_input_token_cost"]
                   + 512 * claude["cache_creation_input_token_cost"]
                   + 87 * claude["output_cost_per_token"]),
        "gemini": ({"promptTokens": 3000, "completionTokens": 500, "totalTokens": 3500,
                    "cachedTokens": 2000, "reasoningTokens": 300},
                   1000 * gemini["input_cost_per_token"]
                   + 2000 * gemini["cache_read_input_token_cost"]
                   + 200 * gemini["output_cost_per_token"]
                   + 300 * gemini["output_cost_per_reasoning_token"]),
    }


async def test_recorded_usage_blocks_are_priced_exactly_and_settle_the_budget(
        make_config, llm, rds, db, monkeypatch, capsys):
    """OpenAI's block on the native stream, Anthropic's and Gemini's through LiteLLM:
    each `final.usage`, `costUsd`, llm_jobs row and budget settlement is the
    hand-computed figure, and `chat-actors usage` shows it."""
    monkeypatch.setenv("SCRIPTED_VENDOR_KEY", "scripted-key")
    user = f"cost-{uuid.uuid4().hex[:8]}"
    environ = {f"CHAT_ACTORS__BUDGETS__USERS__{user.upper()}__USD": "5"}
    for alias, model in (("GPT", "openai/o4-mini"), ("CLAUDE", "anthropic/claude-sonnet-4-5"),
                         ("GEMINI", "gemini/gemini-2.5-flash")):
        prefix = f"CHAT_ACTORS__LLM__MODELS__{alias}__"
        environ |= {f"{prefix}MODEL": model, f"{prefix}API_BASE": llm.url,
                    f"{prefix}API_KEY_ENV": "SCRIPTED_VENDOR_KEY", f"{prefix}MAX_TOKENS": "256"}
    config, path = make_config(environ=environ)
    expected = _hand_computed()
    jobs = {alias: request("What does caching save?", userId=user, model=alias)
            for alias in expected}
    llm.queue(*(Reply(tokens=("Cached", " prompts", " cost less."), usage=usage)
                for usage in (OPENAI_USAGE, ANTHROPIC_USAGE, GEMINI_USAGE)))
    async with worker_running(config):
        finals = {}
        for alias, job in jobs.items():  # one at a time: the scripted replies are in order
            produce(config, job)
            finals[alias] = (await events_of(rds, config, job["jobId"]))[-2]["data"]
    assert ["/chat/completions" in c.path for c in llm.calls] == [True, False, False]
    assert llm.calls[1].path.endswith("/messages")
    assert ":streamGenerateContent" in llm.calls[2].path
    total = 0.0
    for alias, (usage, cost) in expected.items():
        final = finals[alias]
        assert final["usage"] == usage, alias
        assert final["costUsd"] == pytest.approx(cost, rel=1e-9), alias
        row = job_row(db, jobs[alias]["jobId"])
        assert row is not None
        assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"],
                row["cache_write_tokens"], row["reasoning_tokens"]) == (
            usage["promptTokens"], usage["completionTokens"], usage.get("cachedTokens", 0),
            usage.get("cacheWriteTokens", 0), usage.get("reasoningTokens", 0)), alias
        assert float(row["cost_usd"]) == pytest.approx(cost, rel=1e-9)
        total += cost
    reserved, used = db.execute(
        "SELECT reserved, used FROM llm_budget_ledger WHERE scope = %s AND kind = 'usd'",
        (f"user:{user}",)).fetchone()
    assert (float(reserved), float(used)) == (0.0, pytest.approx(total, rel=1e-6))
    capsys.readouterr()
    assert await trio.to_thread.run_sync(cli, ["usage", "--config", str(path), "--user", user]) == 0
    lines = {line.split()[1]: line.split() for line in capsys.readouterr().out.splitlines()[1:]
             if line.startswith(user)}
    assert lines["claude"][2:8] == ["1", "2,572", "2,048", "512", "87", "0"]
    assert float(lines["claude"][8]) == pytest.approx(expected["claude"][1], abs=1e-6)
