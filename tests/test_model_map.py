"""model_map answers for a model LiteLLM's map does not know without importing LiteLLM
(the worker's cold start). Each answer must equal LiteLLM's own: its route, its mapping
of every parameter we send, its price (none) and the capabilities it reports."""

from __future__ import annotations

import msgspec
import pytest

from actors.adapters.llm import chat as llm
from actors.adapters.llm import litellm_wire
from actors.adapters.llm.model_map import NATIVE_PROVIDERS, NO_CAPABILITIES, _map_keys, unmapped
from actors.adapters.llm.openai_wire import Route, _native_params, encode, native_route, needs_litellm
from actors.adapters.llm.pricing import ModelPricing
from messages.ports import Rates, TokenCounts

BASE = "http://10.1.2.3:8000/v1"
# Names a team gives the model it serves (and a few that look like OpenAI's own).
NAMES = ("smollm2", "bench", "scripted", "Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct",
         "my-model", "mistral-small-local", "deepseek-r1-distill", "gemma-3-4b-it", "x",
         "gpt-4o-mini-finetune-ours", "o3-local", "gpt-5-internal", "llama3:8b",
         "chat.v2", "ACME-Chat")
TOOLS = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]
PARAM_SETS = (
    {"max_tokens": 100},
    {"max_tokens": 7, "temperature": 0.3, "top_p": 0.9, "stop": ["\n\n", "END"], "seed": 11},
    {"max_tokens": 50, "tools": TOOLS, "tool_choice": "auto"},
    {"max_tokens": 50, "tools": TOOLS,
     "tool_choice": {"type": "function", "function": {"name": "f"}}},
    {"max_tokens": 50, "response_format": {"type": "json_object"}},
    {"max_tokens": 50, "response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object"}, "strict": True}}},
    {"max_tokens": 64, "reasoning_effort": "low", "temperature": 1.0},
    {"max_tokens": 64, "reasoning_effort": "high", "tools": TOOLS, "tool_choice": "required"},
)
MODELS = [f"{provider}/{name}" for provider in sorted(NATIVE_PROVIDERS) for name in NAMES]


@pytest.mark.parametrize("model", MODELS)
def test_an_unmapped_model_is_answered_as_litellm_answers(model):
    known = unmapped(model)
    if known is None:  # left to LiteLLM: nothing here to agree with
        return
    provider, name = known
    assert model == f"{provider}/{name}"
    route = native_route(model, BASE, "KEY_ENV")
    theirs = litellm_wire.route(model, BASE, "KEY_ENV", "auto")
    assert route is not None and theirs is not None
    assert route == Route(url=theirs.url, model=theirs.model, provider=theirs.provider,
                          api_key_env=theirs.api_key_env, mapped_here=True)
    for params in PARAM_SETS:
        asked = encode(dict(sorted(params.items())))
        ours = msgspec.json.decode(_native_params(provider, asked))
        assert ours == msgspec.json.decode(litellm_wire.mapped_params(name, provider, asked)), params
    pricing = ModelPricing()
    used = TokenCounts(prompt=1000, completion=50, cached=300, cache_write=100, reasoning=10)
    for own in (Rates(), Rates(input=1e-6, output=2e-6),
                Rates(input=1e-6, output=2e-6, cache_read=1e-7, cache_write=3e-6)):
        assert pricing.cost_usd(model, used, own) == llm.cost_usd(model, used, own)
    assert pricing.provider_of(model) == llm.provider_of(model) == provider
    assert pricing.capabilities(model) == llm.capabilities(model) == NO_CAPABILITIES


def test_most_team_names_are_answered_here_and_known_models_never_are():
    answered = [m for m in MODELS if unmapped(m) is not None]
    assert len(answered) >= len(MODELS) * 3 // 4  # the point: most need no LiteLLM
    # o-series and GPT-5 names are mapped differently once LiteLLM knows them: never here.
    assert unmapped("openai/o3-local") is None and unmapped("openai/gpt-5-internal") is None
    for model in ("openai/gpt-4o-mini", "gpt-4o-mini", "anthropic/claude-sonnet-4-5",
                  "hosted_vllm/gpt-4o", "groq/llama-3.1-8b-instant", "openai/", "smollm2"):
        assert unmapped(model) is None, model
    # Every name in the map, under each OpenAI-wire provider, is LiteLLM's to answer.
    keys = sorted(_map_keys())
    assert len(keys) > 1000
    for key in keys[::7]:
        assert unmapped(key) is None, key
        for provider in NATIVE_PROVIDERS:
            assert unmapped(f"{provider}/{key}") is None, (provider, key)


def test_a_worker_needs_litellm_only_for_a_model_it_cannot_answer_here():
    local = ("openai/smollm2", BASE, None, "auto")
    assert not needs_litellm([local])
    assert needs_litellm([local, ("openai/smollm2", BASE, None, "litellm")])
    assert needs_litellm([local, ("openai/smollm2", None, None, "auto")])  # no api_base
    assert needs_litellm([local, ("anthropic/claude-sonnet-4-5", None, "K", "auto")])
    assert needs_litellm([local, ("openai/gpt-4o-mini", None, "K", "auto")])
