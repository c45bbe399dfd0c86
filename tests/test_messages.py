"""The wire contract: a bad request is named by field and rule; good ones decode."""

from __future__ import annotations

import json

import pytest

from messages.wire import BadInput, Final, ProviderSwitched, Usage, decode_request, event_data

ALIASES = frozenset({"local", "priced"})


def decode(value: dict | bytes, max_chars: int = 100):
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return decode_request(raw, max_message_chars=max_chars, model_aliases=ALIASES)


GOOD = {"jobId": "j-1", "userId": "u.1", "sessionId": "s:1", "message": "hi"}


def test_a_minimal_request_gets_the_documented_defaults():
    request = decode({**GOOD, "someFutureField": {"x": 1}})  # unknown fields are ignored
    assert (request.job_id, request.user_id, request.session_id) == ("j-1", "u.1", "s:1")
    assert request.mode == "gen" and request.model is None and request.v == 1
    assert request.params.max_tokens is None and request.timeout_s is None


@pytest.mark.parametrize(("change", "field", "rule"), [
    ({"jobId": None}, "$.jobId", "Expected `str`"),
    ({"jobId": "has space"}, "$.jobId", "matching regex"),
    ({"jobId": "x" * 129}, "$.jobId", "length <= 128"),
    ({"message": ""}, "$.message", "length >= 1"),
    ({"message": "x" * 101}, "$.message", "max_message_chars (100)"),
    ({"mode": "chat"}, "$.mode", "Invalid enum value 'chat'"),
    ({"model": "gpt-9"}, "$.model", "unknown model alias 'gpt-9'"),
    ({"params": {"temperature": 3}}, "$.params.temperature", "<= 2.0"),
    ({"params": {"maxTokens": "many"}}, "$.params.maxTokens", "Expected `int | null`"),
    ({"params": {"topP": 0}}, "$.params.topP", "> 0.0"),
    ({"timeoutS": -1}, "$.timeoutS", "> 0.0"),
    ({"v": 4}, "$.v", "unsupported schema version 4"),
    ({"userId": "alice\n"}, "$.userId", "matching regex"),  # no newline after an id
    ({"sessionId": "s\n"}, "$.sessionId", "matching regex"),
    # Version 3 fields need "v": 3; the carried history's messages are ones a vendor takes.
    ({"v": 2, "history": []}, "$.history", 'must say "v": 3'),
    ({"v": 2, "store": False}, "$.store", 'must say "v": 3'),
    ({"v": 2, "params": {"logitBias": {"5": 1}}}, "$.params.logitBias", 'must say "v": 3'),
    ({"v": 3, "history": [{"role": "robot", "content": "x"}]}, "$.history[0].role",
     "Invalid enum value 'robot'"),
    ({"v": 3, "history": [{"role": "tool", "content": "x"}]}, "$.history[0].toolCallId",
     "required on a tool message"),
    ({"v": 3, "history": [{"role": "user", "content": "x", "toolCallId": "c"}]},
     "$.history[0].toolCallId", "only there"),
    ({"v": 3, "history": [{"role": "user", "toolCalls": [{"id": "c", "name": "f",
                                                          "arguments": "{}"}]}]},
     "$.history[0].toolCalls", "only an assistant message"),
    ({"v": 3, "history": [{"role": "assistant", "content": [
        {"type": "image", "url": "https://a.b/x.png"}]}]}, "$.history[0].content[0]",
     "user messages only"),
    ({"v": 3, "history": [{"role": "user", "content": [
        {"type": "image", "url": "data:image/png;base64,AA=="}]}]},
     "$.history[0].content[0].url", "not a PNG image"),
    ({"v": 3, "history": [{"role": "user", "content": "x" * 101}]}, "$.history[0].content",
     "max_message_chars (100)"),
    ({"v": 3, "metadata": {f"k{n}": "v" for n in range(17)}}, "$.metadata", "length <= 16"),
    ({"v": 3, "params": {"frequencyPenalty": 3}}, "$.params.frequencyPenalty", "<= 2.0"),
    ({"v": 3, "params": {"logitBias": {"token": 1}}}, "$.params.logitBias", "matching regex"),
    # Version 2 fields need "v": 2, and are validated with a named rule.
    ({"tools": [{"name": "f"}]}, "$.tools", 'must say "v": 2'),
    ({"params": {"seed": 1}}, "$.params.seed", 'must say "v": 2'),
    ({"toolResults": [{"toolCallId": "c", "content": "x"}], "v": 1}, "$.toolResults",
     'must say "v": 2'),
    ({"v": 2, "tools": [{"name": "bad name"}]}, "$.tools[0].name", "matching regex"),
    ({"v": 2, "tools": [{"name": f"f{i}"} for i in range(65)]}, "$.tools", "length <= 64"),
    ({"v": 2, "tools": [{"name": "f"}, {"name": "f"}]}, "$.tools[1].name", "named twice"),
    ({"v": 2, "tools": [{"name": "f", "parameters": {"type": "string"}}]},
     "$.tools[0].parameters", '"type": "object"'),
    ({"v": 2, "tools": [{"name": "f"}], "toolChoice": {"name": "g"}}, "$.toolChoice.name",
     "names no tool of the request (f)"),
    ({"v": 2, "toolChoice": "sometimes"}, "$.toolChoice", "Invalid enum value 'sometimes'"),
    ({"v": 2, "toolChoice": "required"}, "$.toolChoice", "needs tools"),
    ({"v": 2, "responseFormat": {"type": "json_schema"}}, "$.responseFormat.schema", "required"),
    ({"v": 2, "responseFormat": {"type": "yaml"}}, "$.responseFormat.type", "Invalid enum"),
    ({"v": 2, "params": {"reasoningEffort": "max"}}, "$.params.reasoningEffort",
     "Invalid enum value 'max'"),
    ({"v": 2, "message": "", "toolResults": [{"toolCallId": "c", "content": "1"},
                                              {"toolCallId": "c", "content": "2"}]},
     "$.toolResults[1].toolCallId", "answered twice"),
    ({"v": 2, "message": "", "toolResults": [{"toolCallId": "c", "content": "x" * 101}]},
     "$.toolResults[0].content", "max_message_chars (100)"),
    ({"v": 2, "message": ""}, "$.message", "length >= 1"),
    ({"v": 2, "attachments": [{"type": "image", "url": "data:image/png;base64,AA=="}]},
     "$.attachments[0].url", "not a PNG image"),
    ({"v": 2, "attachments": [{"type": "image", "url": "data:image/bmp;base64,Qk0="}]},
     "$.attachments[0].url", "data:image/(png|jpeg|webp|gif);base64"),
    ({"v": 2, "attachments": [{"type": "image", "url": "data:image/png;base64,!!"}]},
     "$.attachments[0].url", "not valid base64"),
    ({"v": 2, "attachments": [{"type": "image", "url": "http://example.com/a.png"}]},
     "$.attachments[0].url", "or an https:// URL"),
    ({"v": 2, "attachments": [{"type": "image", "url": "https://169.254.169.254/x.png"}]},
     "$.attachments[0].url", "not in limits.image_url_hosts"),
    ({"v": 2, "attachments": [{"type": "video", "url": "https://a.b/x.mp4"}]},
     "$.attachments[0].type", "Invalid enum value 'video'"),
    ({"v": 2, "attachments": [{"type": "image", "url": "https://a.b/x"}] * 9},
     "$.attachments", "length <= 8"),
    ({"attachments": [{"type": "image", "url": "https://a.b/x"}]},
     "$.attachments", '"v": 2'),
])
def test_bad_fields_are_named_with_their_rule(change, field, rule):
    with pytest.raises(BadInput) as info:
        decode({**GOOD, **change})
    assert info.value.field == field
    assert rule in info.value.rule
    assert field in str(info.value)


def test_a_v2_request_decodes_its_tools_results_and_format():
    request = decode({**GOOD, "v": 2, "message": "", "tools": [{"name": "f"}],
                      "toolChoice": "auto",
                      "toolResults": [{"toolCallId": "call_1", "content": "21 C"}],
                      "responseFormat": {"type": "json_schema", "schema": {"type": "object"}},
                      "params": {"seed": -3, "reasoningEffort": "high"}})
    assert request.tools is not None and request.tools[0].parameters == {
        "type": "object", "properties": {}}
    assert request.tool_results is not None and request.tool_results[0].tool_call_id == "call_1"
    assert (request.params.seed, request.params.reasoning_effort) == (-3, "high")


def test_missing_field_names_the_field_and_keeps_readable_ids():
    with pytest.raises(BadInput) as info:
        decode({"jobId": "j-2", "userId": "u"})
    assert (info.value.field, info.value.rule) == ("$.sessionId", "required field is missing")
    assert (info.value.job_id, info.value.user_id) == ("j-2", "u")


@pytest.mark.parametrize(("raw", "rule"), [
    (b"\xff\xfe", "not UTF-8"),
    (b"{not json", "not a JSON object"),
    (b"[1, 2]", "Expected `object`, got `array`"),
])
def test_undecodable_values_say_why(raw, rule):
    with pytest.raises(BadInput) as info:
        decode(raw)
    assert rule in str(info.value)
    assert info.value.job_id is None


def test_event_data_is_camel_case_json():
    final = Final(text="a", finish_reason="stop", cost_usd=None, model="m",
                  usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3))
    assert json.loads(event_data(final)) == {
        "text": "a", "finishReason": "stop", "costUsd": None, "model": "m",
        "usage": {"promptTokens": 1, "completionTokens": 2, "totalTokens": 3}}
    assert json.loads(event_data(ProviderSwitched(from_="a", to="b", reason="429"))) == {
        "from": "a", "to": "b", "reason": "429"}


@pytest.mark.parametrize(("where", "field", "rule"), [
    ({"$bogus": 1}, "$.rag.where.$bogus", "unknown operator"),
    ({"a": {"$gt": "x"}}, "$.rag.where.a.$gt", "must be a number"),
    ({"a": 1, "b": 2}, "$.rag.where", "exactly one field"),
    ({"$or": [{"a": 1}]}, "$.rag.where.$or", "at least two filters"),
    ({"$and": [{"a": 1}, {"b": {"$in": []}}]}, "$.rag.where.$and[1].b.$in", "non-empty list"),
    ({"a": {"$regex": "x"}}, "$.rag.where.a.$regex", "unknown operator"),
    ({"$or": [{"a": i} for i in range(70)]}, "$.rag.where.$or[63]", "at most 64 conditions"),
])
def test_a_filter_chroma_would_refuse_is_bad_input_naming_the_rule(where, field, rule):
    # These used to reach Chroma, whose InvalidArgumentError escaped the job.
    with pytest.raises(BadInput) as info:
        decode(json.dumps({**GOOD, "rag": {"where": where}}).encode())
    assert info.value.field == field and rule in info.value.rule
    assert info.value.job_id == GOOD["jobId"]


@pytest.mark.parametrize("where", [
    {"source": "a.md"}, {"n": {"$gte": 2}}, {"tag": {"$in": ["x", "y"]}},
    {"$and": [{"source": "a.md"}, {"$or": [{"n": {"$lt": 3}}, {"ok": True}]}]},
])
def test_filters_in_chromas_grammar_pass(where):
    assert decode(json.dumps({**GOOD, "rag": {"where": where}}).encode()).rag.where == where
