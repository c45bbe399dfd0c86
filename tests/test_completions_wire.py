"""OpenAI's Chat Completions on the contract, sans I/O (gateway/openai_wire.py): a body
becomes a v3 request the workers' own decoder takes, or an OpenAIError naming the
parameter (whatever the body); a job's entries become the chunks OpenAI sends, and
text a client holds is never taken back."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.openai_wire import Chunks, OpenAIError, completion, outcome, to_request
from messages.wire import BadInput, decode_request

ALIASES = frozenset({"scripted", "other"})
HI = [{"role": "user", "content": "Hi"}]


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "scripted", "messages": HI, **fields}


def as_request(value: dict[str, Any]) -> Any:
    """The translated fields through the workers' decoder, as the gateway sends them."""
    raw = json.dumps({**value, "jobId": "j", "userId": "u", "sessionId": "cc-j"}).encode()
    return decode_request(raw, max_message_chars=10_000, model_aliases=ALIASES,
                          image_url_hosts=("img.example",))


def test_the_last_user_message_is_the_turn_and_the_rest_its_history():
    translated = to_request(body(messages=[
        {"role": "system", "content": "S"}, {"role": "developer", "content": "D"},
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": [{"type": "text", "text": "Q2 "},
                                     {"type": "image_url", "image_url": {
                                         "url": "https://img.example/x.png", "detail": "low"}},
                                     {"type": "text", "text": "please"}]}]),
        aliases=ALIASES)
    value = translated.value
    assert value["v"] == 3 and value["store"] is False
    assert value["message"] == "Q2 please"
    assert value["attachments"] == [{"type": "image", "url": "https://img.example/x.png"}]
    assert [(m["role"], m["content"]) for m in value["history"]] == [
        ("system", "S"), ("developer", "D"), ("user", "Q1"), ("assistant", "A1")]
    request = as_request(value)
    assert request.carried and not request.stored and request.message == "Q2 please"


def test_trailing_tool_messages_are_the_tool_results_of_the_last_calls():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    value = to_request(body(messages=[
        {"role": "user", "content": "Go"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]}]),
        aliases=ALIASES).value
    assert value["message"] == "" and value["toolResults"] == [
        {"toolCallId": "c1", "content": "42"}]
    assert value["history"][-1]["toolCalls"] == [{"id": "c1", "name": "f", "arguments": "{}"}]
    assert as_request(value).tool_results[0].content == "42"


def test_parameters_map_to_the_contracts():
    translated = to_request(body(
        max_tokens=5, max_completion_tokens=9, temperature=0.5, top_p=0.9, stop="END", seed=3,
        frequency_penalty=1, presence_penalty=-1, logit_bias={"50256": -100},
        reasoning_effort="low", user="u-7", metadata={"k": "v"}, store=True, stream=True,
        stream_options={"include_usage": True}, n=1, logprobs=False, modalities=["text"],
        parallel_tool_calls=False, service_tier="auto", prompt_cache_key="x",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "f"}},
        response_format={"type": "json_schema", "json_schema": {
            "name": "City", "schema": {"type": "object"}, "strict": True}}), aliases=ALIASES)
    value = translated.value
    assert value["params"] == {"temperature": 0.5, "topP": 0.9, "seed": 3,
                               "frequencyPenalty": 1, "presencePenalty": -1, "maxTokens": 9,
                               "stop": ["END"], "logitBias": {"50256": -100},
                               "reasoningEffort": "low"}
    assert value["endUser"] == "u-7" and value["metadata"] == {"k": "v"} and value["store"]
    assert value["toolChoice"] == {"name": "f"}
    assert value["responseFormat"] == {"type": "json_schema", "schema": {"type": "object"},
                                       "name": "City", "strict": True}
    assert translated.stream and translated.include_usage and translated.model == "scripted"
    as_request(value)


@pytest.mark.parametrize(("fields", "status", "param"), [
    ({"model": "gpt-9"}, 404, "model"),
    ({"model": None}, 400, "model"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "Hi"}, 400, "messages"),
    ({"messages": [{"role": "function", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
     "messages[0].content[0].type"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {
        "url": "https://a/x.png"}}]}, *HI]}, 400, "messages[0].content[0].type"),
    ({"messages": [*HI, {"role": "assistant", "content": "prefill"}]}, 400, "messages[1].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "function_call": {}}]}, 400,
     "messages[0].function_call"),
    ({"n": 2}, 400, "n"), ({"logprobs": True}, 400, "logprobs"),
    ({"top_logprobs": 3}, 400, "top_logprobs"), ({"modalities": ["text", "audio"]}, 400,
                                                  "modalities"),
    ({"audio": {"voice": "x"}}, 400, "audio"), ({"functions": [{}]}, 400, "functions"),
    ({"prediction": {}}, 400, "prediction"), ({"web_search_options": {}}, 400,
                                              "web_search_options"),
    ({"tools": [{"type": "custom", "custom": {}}]}, 400, "tools[0].type"),
    ({"tool_choice": {"type": "allowed_tools"}}, 400, "tool_choice.type"),
    ({"response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ({"reasoning_effort": "minimal"}, 400, "reasoning_effort"),
    ({"temperature": "hot"}, 400, "temperature"), ({"stream": "yes"}, 400, "stream"),
    ({"stop": [1]}, 400, "stop[0]"), ({"metadata": []}, 400, "metadata"),
])
def test_what_cannot_be_honoured_is_refused_by_name(fields, status, param):
    with pytest.raises(OpenAIError) as caught:
        to_request(body(**fields), aliases=ALIASES)
    assert caught.value.status == status and caught.value.param == param
    assert caught.value.body()["error"]["message"]


def test_what_the_workers_refuse_is_refused_too():
    for fields, field in [({"temperature": 7}, "$.params.temperature"),
                          ({"logit_bias": {"x": 1}}, "$.params.logitBias"),
                          ({"metadata": {f"k{n}": "v" for n in range(17)}}, "$.metadata"),
                          ({"user": "u" * 300}, "$.endUser")]:
        with pytest.raises(BadInput) as caught:
            as_request(to_request(body(**fields), aliases=ALIASES).value)
        assert caught.value.field == field


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user",
                                                          "assistant", "tool", "x"])},
                                optional={"content": JSON, "tool_calls": JSON,
                                          "tool_call_id": JSON, "name": JSON})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(JSON, st.fixed_dictionaries(
    {"model": st.sampled_from(["scripted", "nope"]), "messages": st.lists(MESSAGE, max_size=4)},
    optional={"stream": JSON, "tools": JSON, "tool_choice": JSON, "response_format": JSON,
              "stop": JSON, "n": JSON, "stream_options": JSON, "temperature": JSON,
              "metadata": JSON, "logit_bias": JSON, "user": JSON})))
def test_any_body_is_a_request_or_a_named_refusal(value):
    """Hostile input: whatever the body, an OpenAIError (4xx) or a value the workers'
    decoder takes or refuses with BadInput; nothing else escapes."""
    try:
        translated = to_request(value, aliases=ALIASES)
    except OpenAIError as error:
        assert 400 <= error.status < 500 and error.message
        return
    try:
        as_request(translated.value)
    except BadInput as exc:
        assert exc.rule


def entry(n: int, event: str, data: dict[str, Any], *, attempt: int = 1, seq: int | None = None,
          job: str = "j") -> tuple[str, dict[str, str]]:
    return (f"1-{n}", {"event": event, "jobId": job, "attempt": str(attempt),
                       "seq": str(n if seq is None else seq), "data": json.dumps(data)})


def lines(data: bytes) -> list[Any]:
    out: list[Any] = []
    for block in data.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block.removeprefix("data: ")
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def chunks(**kwargs: Any) -> Chunks:
    return Chunks(job_id="j", model="scripted", created=1, include_usage=False, **kwargs)


FINAL = {"text": "Hello", "finishReason": "stop", "model": "scripted", "costUsd": None,
         "usage": {"promptTokens": 3, "completionTokens": 2, "totalTokens": 5,
                   "cachedTokens": 1, "reasoningTokens": 1}}


def test_a_job_streams_as_openais_chunks_each_entry_once():
    entries = [entry(0, "started", {"model": "scripted", "mode": "gen", "attempt": 1}),
               entry(1, "reasoning", {"text": "hm"}), entry(2, "token", {"text": "Hel"}),
               entry(3, "token", {"text": "lo"}, job="other"),
               entry(3, "token", {"text": "lo"}), entry(3, "token", {"text": "lo"}),
               entry(4, "tool_call", {"index": 0, "id": "c", "name": "f", "arguments": "{}"}),
               entry(5, "final", FINAL), entry(6, "done", {"status": "completed",
                                                           "partial": False})]
    start = Chunks(job_id="j", model="scripted", created=1, include_usage=True)
    data, state, count = start.frame(entries)
    assert start == Chunks(job_id="j", model="scripted", created=1, include_usage=True)
    assert count == 7 and state.done  # the repeat and the other job's entry skipped
    got = lines(data)
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert got[1]["choices"][0]["delta"] == {"reasoning_content": "hm"}
    assert [g["choices"][0]["delta"].get("content") for g in got[2:4]] == ["Hel", "lo"]
    assert got[4]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert got[5]["choices"][0]["finish_reason"] == "stop"
    assert got[6]["choices"] == [] and got[6]["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 1}
    assert got[7] == "[DONE]"
    assert {g["id"] for g in got[:-1]} == {"chatcmpl-j"}
    # Framed again from the same state (a write the socket refused): the same bytes.
    assert start.frame(entries)[0] == data


def test_a_restart_after_text_ends_the_stream_with_answer_restarted():
    first = chunks().frame([entry(0, "started", {"attempt": 1}),
                            entry(1, "token", {"text": "Old"})])[1]
    data, state, _ = first.frame([entry(0, "started", {"attempt": 2, "restarts": {
        "attempt": 1, "reason": "vendor"}}, attempt=2), entry(1, "token", {"text": "New"},
                                                              attempt=2)])
    got = lines(data)
    assert state.done and got == [{"error": {
        "message": got[0]["error"]["message"], "type": "server_error", "param": None,
        "code": "answer_restarted"}}]


def test_a_resume_that_keeps_every_character_sent_goes_on():
    sent = chunks().frame([entry(0, "started", {"attempt": 1}),
                           entry(1, "token", {"text": "Hello, "})])[1]
    data, state, _ = sent.frame([
        entry(0, "started", {"attempt": 2, "resumes": {"attempt": 1, "chars": 7}}, attempt=2),
        entry(1, "token", {"text": "world"}, attempt=2)])
    assert [g["choices"][0]["delta"] for g in lines(data)] == [{"content": "world"}]
    assert not state.done and state.chars == 12
    # Keeping fewer characters than the client holds takes text back: refused.
    cut = sent.frame([entry(0, "started", {"attempt": 2, "resumes": {"attempt": 1, "chars": 3}},
                            attempt=2)])
    assert lines(cut[0])[0]["error"]["code"] == "answer_restarted"


def test_a_restart_before_anything_was_sent_is_invisible():
    started = chunks().frame([entry(0, "started", {"attempt": 1})])[1]
    data, state, _ = started.frame([entry(0, "started", {"attempt": 2, "restarts": {
        "attempt": 1, "reason": "nothing_streamed"}}, attempt=2),
        entry(1, "token", {"text": "Fresh"}, attempt=2)])
    assert [g["choices"][0]["delta"] for g in lines(data)] == [{"content": "Fresh"}]
    assert not state.done


def test_a_fallback_names_the_answering_alias_and_failures_end_without_done():
    data, state, _ = chunks().frame([
        entry(0, "started", {"attempt": 1}),
        entry(1, "provider", {"from": "scripted", "to": "other", "reason": "429"}),
        entry(2, "token", {"text": "x"}),
        entry(3, "error", {"code": "idle_timeout", "message": "stalled", "retryable": True}),
        entry(4, "done", {"status": "timeout", "partial": True})])
    got = lines(data)
    assert got[1]["system_fingerprint"] == "other" and got[1]["model"] == "scripted"
    assert got[-1]["error"]["code"] == "timeout" and "[DONE]" not in got and state.done
    cancelled = lines(chunks().frame([entry(0, "done", {"status": "cancelled"})])[0])
    assert cancelled[-1]["error"]["code"] == "cancelled"


def test_a_finished_job_is_one_chat_completion_with_usage():
    entries = [entry(0, "started", {"attempt": 1}), entry(1, "reasoning", {"text": "r"}),
               entry(2, "token", {"text": "Hello"}),
               entry(3, "final", {**FINAL, "model": "other", "finishReason": "tool_calls",
                                  "toolCalls": [{"index": 0, "id": "c", "name": "f",
                                                 "arguments": "{}"}]}),
               entry(4, "done", {"status": "completed", "partial": False})]
    assert outcome("j", entries[:-1]) is None
    ended = outcome("j", entries)
    assert ended is not None
    done = completion("j", "scripted", 1, ended)
    message = done["choices"][0]["message"]
    assert message["content"] == "Hello" and message["reasoning_content"] == "r"
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert done["choices"][0]["finish_reason"] == "tool_calls"
    assert done["system_fingerprint"] == "other" and done["usage"]["total_tokens"] == 5
    assert done["usage"]["completion_tokens_details"] == {"reasoning_tokens": 1}
