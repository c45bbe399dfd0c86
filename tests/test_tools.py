"""Contract v2 (contract 2.1, 1.4): tools go to the vendor in OpenAI's form, a tool call
streams as one `tool_call` event per complete call, and `final` carries them."""

from __future__ import annotations

import json

import pytest

from actors.aliases import Aliases, check_capabilities
from config import load_config
from messages.wire import BadInput, decode_request
from tests.fakes import FlatPricing, WordCounting
from tests.helpers import events_of, message_rows, produce, request, worker_running
from tests.scripted_llm import Reply

WEATHER = {"name": "get_weather", "description": "The weather in a city now.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
CALLS = (("call_abc", "get_weather", ('{"ci', 'ty": "Par', "", 'is"}')),)
TOOLS_ON = {"CHAT_ACTORS__LLM__MODELS__SCRIPTED__TOOLS": "true"}


async def test_a_tool_call_streams_as_its_own_event_and_ends_the_answer(
        make_config, llm, rds, db):
    config, _ = make_config(environ=TOOLS_ON)
    llm.default = Reply(tokens=(), tool_calls=CALLS, finish_reason="tool_calls")
    req = request("Weather in Paris?", v=2, tools=[WEATHER], toolChoice={"name": "get_weather"},
                  params={"seed": 7})
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    assert [e["event"] for e in events] == ["started", "tool_call", "final", "done"]
    call = {"index": 0, "id": "call_abc", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert events[1]["data"] == call
    final = events[2]["data"]
    assert (final["finishReason"], final["toolCalls"], final["text"]) == ("tool_calls", [call], "")
    assert events[-1]["data"]["status"] == "completed"
    body = llm.calls[0].body
    assert body["tools"] == [{"type": "function", "function": WEATHER}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["seed"] == 7
    assert [m["role"] for m in message_rows(db, req["jobId"])][0] == "user"


def _decode(body: dict) -> object:
    config = load_config()
    return decode_request(json.dumps(body).encode(), max_message_chars=100,
                          model_aliases=frozenset(config.llm.models))


@pytest.mark.parametrize(("alias_tools", "refused"), [(None, True), (True, False)])
def test_tools_need_an_alias_that_takes_them(alias_tools, refused):
    """The model map does not know a self-hosted model: tools are refused unless its
    alias says `tools = true`."""
    environ = {} if alias_tools is None else {"CHAT_ACTORS__LLM__MODELS__LOCAL__TOOLS": "true"}
    config = load_config(environ=environ)
    chain = Aliases.resolve(config, FlatPricing(), WordCounting()).chain
    req = _decode(request("hi", v=2, tools=[WEATHER]))
    if refused:
        with pytest.raises(BadInput) as info:
            check_capabilities(req, chain(req.model))
        assert info.value.field == "$.tools" and "takes no tools" in info.value.rule
        assert "llm.models.local.tools = true" in info.value.rule
    else:
        check_capabilities(req, chain(req.model))
    effort = _decode(request("hi", v=2, params={"reasoningEffort": "low"}))
    with pytest.raises(BadInput, match="is not a reasoning model"):
        check_capabilities(effort, chain(effort.model))


async def test_tool_results_answer_the_pending_call_on_the_next_turn(make_config, llm, rds, db):
    """Turn 1 calls a tool; turn 2 brings its result, and the vendor sees a valid
    conversation (the assistant's call, then the `tool` message); a result naming no
    pending call is refused with no model call."""
    config, _ = make_config(environ=TOOLS_ON)
    llm.queue(Reply(tokens=(), tool_calls=CALLS, finish_reason="tool_calls"),
              Reply(tokens=("It is 21 C", " in Paris.")))
    ask = request("Weather in Paris?", v=2, tools=[WEATHER], sessionId="s-tools")
    result = request("", v=2, tools=[WEATHER], sessionId="s-tools",
                     toolResults=[{"toolCallId": "call_abc", "content": "21 C, sunny"}])
    stray = request("", v=2, tools=[WEATHER], sessionId="s-tools",
                    toolResults=[{"toolCallId": "call_zzz", "content": "?"}])
    async with worker_running(config):
        produce(config, ask, result, stray)
        await events_of(rds, config, ask["jobId"])
        answered = await events_of(rds, config, result["jobId"])
        refused = await events_of(rds, config, stray["jobId"])
    assert answered[-2]["data"]["text"] == "It is 21 C in Paris."
    sent = llm.calls[1].body["messages"]
    assert sent[1:] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "21 C, sunny"}]
    assert [(e["event"], e["data"].get("code")) for e in refused[-2:]] == [
        ("error", "bad_request"), ("done", None)]
    assert refused[-1]["data"]["status"] == "rejected" and len(llm.calls) == 2
    rows = [(m["role"], m["content"], m["tool_call_id"])
            for job in (ask, result, stray) for m in message_rows(db, job["jobId"])]
    assert rows == [("user", "Weather in Paris?", None), ("assistant", "", None),
                    ("tool", "21 C, sunny", "call_abc"),
                    ("assistant", "It is 21 C in Paris.", None)]


async def test_anthropics_thinking_and_tool_use_stream_and_go_back_signed(
        make_config, llm, rds, db, monkeypatch):
    """The Anthropic Messages wire through LiteLLM: a redacted thinking block and a
    signed one, then a tool_use whose input arrives as input_json_delta pieces. The
    next turn sends both blocks back whole and in order (the signature, the redacted
    data), before the tool_use and its result."""
    monkeypatch.setenv("SCRIPTED_ANTHROPIC_KEY", "sk-ant-scripted")
    alias = "CHAT_ACTORS__LLM__MODELS__CLAUDE__"
    config, _ = make_config(environ={
        f"{alias}MODEL": "anthropic/claude-3-7-sonnet-20250219", f"{alias}API_BASE": llm.url,
        f"{alias}API_KEY_ENV": "SCRIPTED_ANTHROPIC_KEY", f"{alias}TOOLS": "true",
        f"{alias}REASONING": "true", f"{alias}MAX_TOKENS": "256"})
    llm.queue(Reply(reasoning=("The user wants", " the weather."), tokens=(),
                    redacted=("EqQBCkgIARABGAIiQHSd-opaque",),
                    tool_calls=(("toolu_1", "get_weather", ('{"ci', 'ty": "Par', "", 'is"}')),)),
              Reply(tokens=("21 C", " in Paris.")))
    ask = request("Weather in Paris?", v=2, model="claude", tools=[WEATHER], sessionId="s-claude")
    result = request("", v=2, model="claude", tools=[WEATHER], sessionId="s-claude",
                     toolResults=[{"toolCallId": "toolu_1", "content": "21 C"}])
    async with worker_running(config):
        produce(config, ask, result)
        first = await events_of(rds, config, ask["jobId"])
        second = await events_of(rds, config, result["jobId"])
    assert "".join(e["data"]["text"] for e in first if e["event"] == "reasoning") == \
        "The user wants the weather."
    call = next(e["data"] for e in first if e["event"] == "tool_call")
    assert (call["id"], call["name"], call["arguments"]) == (
        "toolu_1", "get_weather", '{"city": "Paris"}')
    assert first[-2]["data"]["finishReason"] == "tool_calls"
    assert second[-2]["data"]["text"] == "21 C in Paris."
    assert llm.calls[1].path.endswith("/messages")
    sent = llm.calls[1].body["messages"]
    assistant = next(m for m in sent if m["role"] == "assistant")
    kinds = [block["type"] for block in assistant["content"]]
    assert kinds == ["redacted_thinking", "thinking", "tool_use"]
    assert assistant["content"][0] == {"type": "redacted_thinking",
                                       "data": "EqQBCkgIARABGAIiQHSd-opaque"}
    assert assistant["content"][1]["signature"] == "sig-scripted"
    assert assistant["content"][1]["thinking"] == "The user wants the weather."
    assert assistant["content"][2]["input"] == {"city": "Paris"}
    results = [b for m in sent if m["role"] == "user" and isinstance(m["content"], list)
               for b in m["content"] if b.get("type") == "tool_result"]
    assert [(r["tool_use_id"], r["content"]) for r in results] in (
        [("toolu_1", "21 C")], [("toolu_1", [{"type": "text", "text": "21 C"}])])
