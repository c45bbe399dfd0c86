"""The native OpenAI-wire path against the scripted vendor over real HTTP.

LiteLLM still decides the route, the parameter mapping and the error classes;
these tests pin each of those down, and the SSE parsing across odd reads.
"""

from __future__ import annotations

import contextlib
import json
from functools import partial

import pytest
import trio

from actors.adapters.llm.openai_wire import (
    MAX_SSE_LINE,
    OpenAIWireChat,
    Route,
    _PartialLine,
    _read_events,
    resolve,
)
from actors.errors import PermanentError, TransientError
from actors.job.provider import assemble_tool_calls
from messages.mailboxes import ReasoningDelta, StreamFinished, TokenDelta, ToolCallDelta
from tests.hostile import BROKEN_HTTP
from tests.scripted_llm import Reply

MESSAGES = [{"role": "user", "content": "hi"}]


async def collect(llm, model: str = "openai/scripted", params=None, **kwargs):
    chat = OpenAIWireChat()
    send, receive = trio.open_memory_channel(1000)
    try:
        await chat.stream(model=model, api_base=llm.url, api_key_env=kwargs.pop("key_env", None),
                          messages=MESSAGES, params=params or {"max_tokens": 20}, out=send,
                          **kwargs)
    finally:
        await chat.aclose()
    return [item async for item in receive]


def test_routes_openai_wire_vendors_natively_and_the_rest_through_litellm():
    local = resolve("openai/smollm2", "http://127.0.0.1:8088/v1/", None, "auto")
    assert local == Route(url="http://127.0.0.1:8088/v1/chat/completions", model="smollm2",
                          provider="openai", api_key_env=None, mapped_here=True)
    hosted = resolve("gpt-4o-mini", None, None, "auto")
    assert hosted is not None and hosted.url == "https://api.openai.com/v1/chat/completions"
    assert hosted.api_key_env == "OPENAI_API_KEY"
    assert resolve("anthropic/claude-3-5-sonnet", None, "ANTHROPIC_API_KEY", "auto") is None
    assert resolve("openai/smollm2", "http://h/v1", None, "litellm") is None
    groq = "groq/llama-3.1-8b-instant"
    assert resolve(groq, None, "GROQ_API_KEY", "auto") is None  # not on the native list
    forced = resolve(groq, None, "GROQ_API_KEY", "openai")
    assert forced is not None and forced.url == "https://api.groq.com/openai/v1/chat/completions"


async def test_streams_text_usage_and_finish(llm):
    llm.default = Reply(tokens=("Hel", "lo", " there"), prompt_tokens=9)
    items = await collect(llm)
    assert "".join(i.text for i in items if isinstance(i, TokenDelta)) == "Hello there"
    assert items[-1] == StreamFinished(finish_reason="stop", prompt_tokens=9, completion_tokens=3,
                                       model="scripted")
    body = llm.calls[0].body
    assert body["model"] == "scripted" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["messages"] == MESSAGES


async def test_litellm_maps_the_parameters_for_the_model(llm):
    llm.default = Reply(tokens=("ok",))
    await collect(llm, model="openai/gpt-5-mini", params={"max_tokens": 33, "temperature": 0.2})
    body = llm.calls[0].body
    # A reasoning model takes max_completion_tokens and no temperature (LiteLLM drops it).
    assert body["max_completion_tokens"] == 33
    assert "max_tokens" not in body and "temperature" not in body


async def test_the_key_comes_from_the_named_environment_variable(llm, monkeypatch):
    monkeypatch.setenv("WIRE_TEST_KEY", "sk-wire-test-1234")
    llm.default = Reply(tokens=("ok",))
    await collect(llm, key_env="WIRE_TEST_KEY")
    headers = {k.lower(): v for k, v in llm.calls[0].headers.items()}
    assert headers["authorization"] == "Bearer sk-wire-test-1234"


@pytest.mark.parametrize(("reply", "kind", "code"), [
    (Reply(status=401, error_body='{"error": {"message": "bad key"}}'), PermanentError, "auth"),
    (Reply(status=400, error_body='{"error": {"message": "This model\'s maximum context length is '
                                  '2048 tokens", "code": "context_length_exceeded"}}'),
     PermanentError, "context_length"),
    (Reply(status=404, error_body='{"error": {"message": "no such model"}}'), PermanentError,
     "model_not_found"),
    (Reply(status=503), TransientError, None),
])
async def test_vendor_errors_are_classified_by_litellm(llm, reply, kind, code):
    llm.queue(reply)
    with pytest.raises(kind) as caught:
        await collect(llm)
    if code is not None:
        assert caught.value.code == code


async def test_a_429_keeps_its_retry_after(llm):
    llm.queue(Reply(status=429, headers=(("retry-after", "3"),)))
    with pytest.raises(TransientError) as caught:
        await collect(llm)
    assert caught.value.retry_after == 3
    assert "RateLimitError" in str(caught.value)


async def test_a_stream_cut_before_its_finish_is_transient(llm):
    llm.queue(Reply(tokens=("a", "b", "c", "d"), break_after=2))
    send, receive = trio.open_memory_channel(100)
    chat = OpenAIWireChat()
    with pytest.raises(TransientError):
        await chat.stream(model="openai/scripted", api_base=llm.url, api_key_env=None,
                          messages=MESSAGES, params={}, out=send)
    await chat.aclose()
    send.close()
    assert "".join([i.text async for i in receive]) == "ab"  # what came before the cut was sent


async def test_a_refused_connection_is_transient():
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    send, _ = trio.open_memory_channel(1)
    chat = OpenAIWireChat()
    with pytest.raises(TransientError, match="connection failed"):
        await chat.stream(model="openai/x", api_base=f"http://127.0.0.1:{port}/v1",
                          api_key_env=None, messages=MESSAGES, params={}, out=send)
    await chat.aclose()


class SplitResponse:
    """Bytes arriving in arbitrary pieces, as TCP may deliver them."""

    def __init__(self, data: bytes, cut: int) -> None:
        self.pieces = [data[i:i + cut] for i in range(0, len(data), cut)]

    async def aiter_bytes(self):
        for piece in self.pieces:
            yield piece
            await trio.lowlevel.checkpoint()


def sse(*events: dict) -> bytes:
    lines = [f"data: {json.dumps(e)}\r\n\r\n" for e in events]
    return ("".join(lines) + ": keep-alive comment\n\ndata: [DONE]\n\n").encode()


@pytest.mark.parametrize("cut", [1, 7, 64, 100_000])
async def test_sse_lines_split_across_reads_are_reassembled(cut):
    data = sse(*[{"choices": [{"delta": {"content": f"t{i} "}}]} for i in range(5)],
               {"choices": [{"delta": {}, "finish_reason": "length"}]},
               {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5}, "model": "m2"})
    send, receive = trio.open_memory_channel(1000)
    route = Route(url="u", model="m", provider="openai", api_key_env=None)
    await _read_events(SplitResponse(data, cut).aiter_bytes(), send, route)
    send.close()
    items = [i async for i in receive]
    assert "".join(i.text for i in items[:-1]) == "t0 t1 t2 t3 t4 "
    assert items[-1] == StreamFinished(finish_reason="length", prompt_tokens=4, completion_tokens=5,
                                       model="m2")
    if cut == 100_000:
        assert len(items) == 2  # one read: all its tokens in one delta


async def test_an_error_object_mid_stream_is_transient():
    data = sse({"choices": [{"delta": {"content": "a"}}]}, {"error": {"message": "overloaded"}})
    send, _ = trio.open_memory_channel(10)
    route = Route(url="u", model="m", provider="openai", api_key_env=None)
    with pytest.raises(TransientError, match="overloaded"):
        await _read_events(SplitResponse(data, 1000).aiter_bytes(), send, route)


def test_cached_flat_prices_equal_litellms_own_sum():
    """cost_usd caches a flat per-token price; it must agree with LiteLLM for every
    model LiteLLM prices, tiered ones included (those still go through LiteLLM)."""
    import random

    import litellm

    from actors.adapters.llm.chat import _pricing, cost_usd
    from actors.adapters.llm.model_map import MapRates as _MapRates
    from messages.ports import Rates, TokenCounts

    # (github_copilot's price lookup logs in over the network: not a model for us)
    chat_models = sorted(m for m, info in litellm.model_cost.items()
                         if info.get("mode") == "chat" and m != "sample_spec"
                         and info.get("litellm_provider") not in ("github_copilot", "chatgpt"))
    checked = 0
    for model in random.Random(5).sample(chat_models, 400) + ["gpt-4o-mini", "gemini/gemini-2.5-pro",
                                                              "deepseek/deepseek-v4-pro"]:
        for prompt, completion in ((1200, 300), (250_000, 10)):
            used = TokenCounts(prompt=prompt, completion=completion)
            try:
                expected = sum(litellm.cost_per_token(model=model, prompt_tokens=prompt,
                                                      completion_tokens=completion))
            except Exception:
                assert cost_usd(model, used, Rates()) is None
                continue
            assert cost_usd(model, used, Rates()) == pytest.approx(expected), model
            checked += 1
    assert checked > 200
    assert _pricing("gemini/gemini-2.5-pro") == "litellm"  # tiered above 200k tokens
    assert _pricing("deepseek/deepseek-v4-pro") == "litellm"  # its own calculator
    assert isinstance(_pricing("gpt-4o-mini"), _MapRates)
    assert _pricing("openai/no-such-model-anywhere") == "unpriced"


def test_a_line_split_over_many_reads_is_joined_once_and_bounded():
    route = Route(url="u", model="m", provider="openai", api_key_env=None)
    line = _PartialLine(route)
    event = b'data: {"choices": []}'
    pieces = [event[i:i + 1] for i in range(len(event))] + [b"\n\ndata: x"]
    assert [line.complete(p) for p in pieces][-1] == [event, b""]
    endless = _PartialLine(route)
    with pytest.raises(TransientError, match="SSE line longer than") as refused:
        for _ in range(MAX_SSE_LINE // 65536 + 2):  # a vendor that never ends a line
            endless.complete(b"x" * 65536)
    assert refused.value.kind == "protocol"


@pytest.mark.parametrize("kind", BROKEN_HTTP)
async def test_a_vendor_speaking_broken_http_is_a_transient_protocol_error(kind):
    async def vendor(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(BROKEN_HTTP[kind])
            await trio.sleep_forever()  # never closes: only the parser can end the call

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, vendor, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        send, _ = trio.open_memory_channel(10)
        chat = OpenAIWireChat()
        with pytest.raises(TransientError, match="broken HTTP") as failed:
            await chat.stream(model="openai/x", api_base=f"http://127.0.0.1:{port}/v1",
                              api_key_env=None, messages=MESSAGES, params={}, out=send)
        assert failed.value.kind == "protocol"
        await chat.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("cut", [1, 13, 100_000])
async def test_reasoning_streams_apart_from_the_answer_in_order(cut):
    """DeepSeek and vLLM send `reasoning_content`, OpenRouter and Ollama `reasoning`;
    either becomes ReasoningDelta, never answer text, and runs keep their order."""
    data = sse({"choices": [{"delta": {"role": "assistant", "reasoning_content": "Think",
                                       "content": None}}]},
               {"choices": [{"delta": {"reasoning_content": "ing."}}]},
               {"choices": [{"delta": {"content": "Answer"}}]},
               {"choices": [{"delta": {"reasoning": " More"}}]},
               {"choices": [{"delta": {"content": "!"}, "finish_reason": "stop"}]})
    send, receive = trio.open_memory_channel(1000)
    route = Route(url="u", model="m", provider="openai", api_key_env=None)
    await _read_events(SplitResponse(data, cut).aiter_bytes(), send, route)
    send.close()
    items = [i async for i in receive]
    runs: list[tuple[str, str]] = []
    for item in items[:-1]:
        kind = type(item).__name__
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] + item.text)
        else:
            runs.append((kind, item.text))
    assert runs == [("ReasoningDelta", "Thinking."), ("TokenDelta", "Answer"),
                    ("ReasoningDelta", " More"), ("TokenDelta", "!")]
    if cut == 100_000:
        assert len(items) == 5  # one read: one delta per run


async def stream_via(llm, stream_path: str) -> list:
    """One answer from the scripted vendor, natively or through LiteLLM (the bridge)."""
    if stream_path == "openai":
        return await collect(llm, stream_path="openai")
    from actors.adapters import aio
    from actors.adapters.llm.chat import LiteLLMChat, close_clients

    send, receive = trio.open_memory_channel(1000)
    async with aio.open_bridge(closing=[close_clients]):
        await LiteLLMChat().stream(model="openai/scripted", api_base=llm.url, api_key_env=None,
                                   messages=MESSAGES, params={"max_tokens": 20}, out=send)
    return [item async for item in receive]


@pytest.mark.parametrize("stream_path", ["openai", "litellm"])
async def test_both_stream_paths_give_the_same_reasoning_and_answer(llm, stream_path):
    llm.default = Reply(reasoning=("Let me", " think."), tokens=("Four", "."))
    items = await stream_via(llm, stream_path)
    reasoning = "".join(i.text for i in items if isinstance(i, ReasoningDelta))
    answer = "".join(i.text for i in items if isinstance(i, TokenDelta))
    assert (reasoning, answer) == ("Let me think.", "Four.")
    first_answer = next(n for n, i in enumerate(items) if isinstance(i, TokenDelta))
    assert all(not isinstance(i, ReasoningDelta) for i in items[first_answer:])


CALLS = (("call_abc", "get_weather", ('{"ci', 'ty": "Par', "", 'is"}')),
         ("call_def", "get_time", ("{}",)))


@pytest.mark.parametrize("stream_path", ["openai", "litellm"])
async def test_both_stream_paths_give_split_tool_calls_byte_for_byte(llm, stream_path):
    """Arguments split over many deltas (one of them empty), the id and name only in
    the first: one call each, its arguments exactly what the vendor sent."""
    llm.default = Reply(tokens=("Let me look.",), tool_calls=CALLS, finish_reason="tool_calls")
    items = await stream_via(llm, stream_path)
    pieces: dict[int, list[ToolCallDelta]] = {}
    for item in items:
        if isinstance(item, ToolCallDelta):
            pieces.setdefault(item.index, []).append(item)
    calls = assemble_tool_calls(pieces, "scripted")
    assert [(c.index, c.id, c.name, c.arguments) for c in calls] == [
        (0, "call_abc", "get_weather", '{"city": "Paris"}'), (1, "call_def", "get_time", "{}")]
    assert items[-1].finish_reason == "tool_calls"
    assert "".join(i.text for i in items if isinstance(i, TokenDelta)) == "Let me look."
