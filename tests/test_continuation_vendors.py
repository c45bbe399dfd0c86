"""Continuation on every vendor (contract 3.3, "One decision"), on the real stack.

The scripted vendors behave like the real ones at the wire: the Anthropic Messages
API through LiteLLM's Anthropic route refuses a prefill for Claude 4.6 and later
and continues one for 4.5 (LiteLLM strips the prefill's trailing whitespace, as
Anthropic requires); Mistral refuses an assistant turn without `prefix: true`. A
stream broken mid-answer never fails the job: it continues where that is safe,
else the answer starts over as a new attempt, and a client that follows the
contract always ends with exactly `final.text`.
"""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import (
    assembled,
    events_of,
    job_row,
    message_rows,
    produce,
    request,
    until,
    worker_running,
)
from tests.hostile import BROKEN_HTTP
from tests.scripted_llm import Reply, text_of

TOKENS = tuple(f"w{i} " for i in range(20))
FULL = "".join(TOKENS)


@pytest.fixture(autouse=True)
def vendor_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteLLM's Anthropic and Mistral routes send nothing without a key."""
    monkeypatch.setenv("SCRIPTED_LLM_KEY", "sk-scripted-not-secret")


def _alias(name: str, model: str, url: str, **keys: str) -> dict[str, str]:
    prefix = f"CHAT_ACTORS__LLM__MODELS__{name.upper()}__"
    return {f"{prefix}MODEL": model, f"{prefix}API_BASE": url,
            f"{prefix}API_KEY_ENV": "SCRIPTED_LLM_KEY",
            **{prefix + key.upper(): value for key, value in keys.items()}}


def _started(events) -> list[dict]:
    return [e["data"] for e in events if e["event"] == "started"]


def _check_whole(events, db, job_id: str, *, attempt: int) -> None:
    """The job completed as `attempt`: a client assembles exactly `final.text`, the
    whole answer, kept once in the history."""
    final = next(e["data"] for e in events if e["event"] == "final")
    assert assembled(events).text == final["text"] == FULL
    assert [e["event"] for e in events].count("done") == 1
    row = job_row(db, job_id)
    assert (row["status"], row["attempt"]) == ("completed", attempt)
    assert [m["content"] for m in message_rows(db, job_id) if m["role"] == "assistant"] == [FULL]


async def _after_a_break(config, llm, rds, *, model: str | None = None,
                         metric: str | None = None, **cut: object):
    """One job whose first stream breaks after 5 of its 20 tokens (`cut`: more of that
    reply), every later call answering and continuing a prefill: the request, its
    events, and the worker's `metric` samples once it ended."""
    llm.queue(Reply(tokens=TOKENS, break_after=5, **cut))
    llm.default = Reply(tokens=TOKENS, continues=True)
    req = request("tell me", **({"model": model} if model else {}))
    async with worker_running(config) as worker:
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
        samples = await _metric(worker.health_port, metric) if metric else {}
    return req, events, samples


async def _metric(port: int, name: str) -> dict[str, float]:
    """The samples of one counter on the worker's /metrics, by their labels."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return {line.split("{", 1)[1].split("}", 1)[0] if "{" in line else "": float(line.split()[-1])
            for line in text.splitlines() if line.startswith(f"{name}_total")}


async def test_claude_4_6_broken_mid_answer_restarts_inside_the_worker(make_config, llm, rds,
                                                                       db):
    """Claude 4.6 takes no prefill (LiteLLM's map says so, and the vendor refuses one):
    a stream broken after 5 of 20 tokens is retried without one, as attempt 2."""
    config, _ = make_config(environ=_alias("claude", "anthropic/claude-sonnet-4-6", llm.url))
    req, events, restarts = await _after_a_break(config, llm, rds, model="claude",
                                                 metric="chat_actors_restarts")
    assert [s["attempt"] for s in _started(events)] == [1, 2]
    assert _started(events)[1]["restarts"] == {"attempt": 1, "reason": "vendor"}
    assert len(llm.calls) == 2 and all(c.path.endswith("/messages") for c in llm.calls)
    assert llm.calls[1].messages[-1]["role"] == "user"  # never the refused prefill
    first = "".join(e["data"]["text"] for e in events
                    if e["event"] == "token" and e["attempt"] == "1")
    assert first == "".join(TOKENS[:5])  # what attempt 1 showed, which clients discard
    _check_whole(events, db, req["jobId"], attempt=2)
    usage = next(e["data"] for e in events if e["event"] == "final")["usage"]
    assert usage["completionTokens"] >= 20 + 5  # both attempts are paid for
    assert restarts == {'reason="vendor"': 1.0}


async def test_claude_4_5_continues_its_answer_through_the_anthropic_wire(make_config, llm,
                                                                          rds, db):
    """Claude 4.5 takes a prefill: the broken answer continues in the same attempt,
    the prefill without the whitespace the client holds at its end (Anthropic refuses
    it), and that whitespace is not sent again."""
    config, _ = make_config(environ=_alias("claude", "anthropic/claude-sonnet-4-5", llm.url))
    req, events, _ = await _after_a_break(config, llm, rds, model="claude")
    assert [s["attempt"] for s in _started(events)] == [1]
    last = llm.calls[1].messages[-1]
    assert last["role"] == "assistant" and text_of(last["content"]) == "".join(TOKENS[:5]).rstrip()
    tokens = "".join(e["data"]["text"] for e in events if e["event"] == "token")
    assert tokens == FULL  # each character once: no doubled space at the seam
    _check_whole(events, db, req["jobId"], attempt=1)


async def test_an_anthropic_stream_that_ends_without_its_stop_is_no_answer(make_config, llm,
                                                                          rds, db):
    """The body ends cleanly after 5 tokens, but without message_delta/message_stop:
    a stream cut short, and the answer continues instead of completing 5 tokens."""
    config, _ = make_config(environ=_alias("claude", "anthropic/claude-sonnet-4-5", llm.url))
    req, events, _ = await _after_a_break(config, llm, rds, model="claude", end_clean=True)
    assert len(llm.calls) == 2 and llm.calls[1].messages[-1]["role"] == "assistant"
    provider = next(e["data"] for e in events if e["event"] == "provider")
    assert "before a finish_reason was received" in provider["reason"]
    _check_whole(events, db, req["jobId"], attempt=1)


async def test_a_vendor_that_refuses_the_prefill_it_was_said_to_take_restarts_once(
        make_config, llm, rds, db):
    """The config says the alias continues; Claude Opus 4.7 refuses. The refusal is
    recognised: one restart without a prefill (`vendor_refused`), never a failed job,
    and the next job of that alias in this process restarts without asking again."""
    config, _ = make_config(environ=_alias("claude", "anthropic/claude-opus-4-7", llm.url,
                                           continues="true"))
    llm.queue(Reply(tokens=TOKENS, break_after=5))
    llm.default = Reply(tokens=TOKENS, continues=True)
    first, second = request("one", model="claude"), request("two", model="claude")
    async with worker_running(config) as worker:
        produce(config, first)
        events = await events_of(rds, config, first["jobId"])
        assert len(llm.calls) == 3
        assert [c.messages[-1]["role"] for c in llm.calls] == ["user", "assistant", "user"]
        assert _started(events)[1]["restarts"] == {"attempt": 1, "reason": "vendor_refused"}
        _check_whole(events, db, first["jobId"], attempt=2)
        llm.queue(Reply(tokens=TOKENS, break_after=5))
        produce(config, second)
        again = await events_of(rds, config, second["jobId"])
        refusals = await _metric(worker.health_port, "chat_actors_prefill_refused")
    assert len(llm.calls) == 5 and llm.calls[4].messages[-1]["role"] == "user"
    assert _started(again)[1]["restarts"] == {"attempt": 1, "reason": "vendor_refused"}
    _check_whole(again, db, second["jobId"], attempt=2)
    assert refusals == {'alias="claude",vendor="anthropic"': 1.0}  # counted once


@pytest.mark.parametrize("stream_path", ["auto", "litellm"])
async def test_a_self_served_mistral_that_wants_prefix_true_is_recognised(
        stream_path, make_config, llm, rds, db):
    """A Mistral model served behind an OpenAI-compatible route: the map cannot know it
    wants `prefix: true`, so the first continuation is refused with Mistral's own 400;
    on either stream path that is recognised and the answer restarts."""
    config, _ = make_config(environ=_alias("mistral", "openai/mistral-small-latest", llm.url,
                                           stream_path=stream_path))
    req, events, _ = await _after_a_break(config, llm, rds, model="mistral")
    assert [c.messages[-1]["role"] for c in llm.calls] == ["user", "assistant", "user"]
    assert _started(events)[1]["restarts"] == {"attempt": 1, "reason": "vendor_refused"}
    _check_whole(events, db, req["jobId"], attempt=2)


async def test_a_fallback_decides_again_for_its_own_vendor(make_config, llm, rds, db):
    """A continuing alias falls back to Claude 4.6 after its text was shown: the
    fallback cannot take the prefill, so the answer starts over there."""
    config, _ = make_config(environ={
        **_alias("claude", "anthropic/claude-sonnet-4-6", llm.url),
        "CHAT_ACTORS__LLM__MODELS__SCRIPTED__FALLBACKS": '["claude"]',
        "CHAT_ACTORS__LLM__RETRIES": "0"})
    req, events, _ = await _after_a_break(config, llm, rds)
    assert [c.path.endswith("/messages") for c in llm.calls] == [False, True]
    assert llm.calls[1].messages[-1]["role"] == "user"
    started = _started(events)[1]
    assert (started["model"], started["attempt"], started["restarts"]) == (
        "claude", 2, {"attempt": 1, "reason": "vendor"})
    _check_whole(events, db, req["jobId"], attempt=2)


async def test_extra_params_reach_the_vendor_as_they_are(make_config, llm, rds):
    """Anthropic's thinking `display`, which the map does not know, goes in the
    Messages request unchanged; an OpenAI-wire vendor gets its own key too."""
    thinking = {"type": "enabled", "budget_tokens": 1024, "display": "summarized"}
    config, _ = make_config(
        extra="[llm.models.claude]\nmodel = \"anthropic/claude-sonnet-4-5\"\n"
              f"api_base = \"{llm.url}\"\napi_key_env = \"SCRIPTED_LLM_KEY\"\n"
              "max_tokens = 2048\ncontext_window = 8192\n"
              "extra_params = { thinking = { type = \"enabled\", budget_tokens = 1024, "
              "display = \"summarized\" } }\n",
        environ={"CHAT_ACTORS__LLM__MODELS__SCRIPTED__EXTRA_PARAMS":
                 "{ chat_template_kwargs = { enable_thinking = false } }"})
    one, two = request("think", model="claude"), request("plain")
    async with worker_running(config):
        produce(config, one, two)
        await events_of(rds, config, one["jobId"])
        await events_of(rds, config, two["jobId"])
    bodies = {c.path.endswith("/messages"): c.body for c in llm.calls}
    assert bodies[True]["thinking"] == thinking
    assert bodies[False]["chat_template_kwargs"] == {"enable_thinking": False}
    assert "thinking" not in bodies[False]


async def test_a_job_taken_over_elsewhere_is_not_sent_to_the_model_again(make_config, llm,
                                                                         rds, db):
    """While an attempt waits out a 429's Retry-After, another worker takes the job
    over (attempt 2 in Postgres, its fence raised in Redis). The waiting attempt reads
    its fence before the retry and stops: the vendor is not called for it again, and
    it writes nothing more. (The lease keeper would notice only much later.)"""
    config, _ = make_config(environ={"CHAT_ACTORS__JOBS__LEASE_S": "120"})
    llm.queue(Reply(status=429, headers=(("retry-after", "2"),)))
    req = request("taken over")
    keys = config.job_keys(req["jobId"])
    async with worker_running(config) as worker:
        produce(config, req)
        # Its `provider` event (the retry to come) is written: the attempt now only
        # waits out the Retry-After, writing nothing until its next try.
        await until(lambda: [f["event"] for _, f in rds.xrange(keys.stream)] == [
            "started", "provider"], 30)
        db.execute("UPDATE llm_jobs SET attempt = 2, lease_owner = 'elsewhere' "
                   "WHERE job_id = %s", (req["jobId"],))
        rds.set(keys.attempt, 2)
        await until(lambda: worker.registry.running() == 0, 30)  # the attempt has ended
        assert len(llm.calls) == 1
        assert await _metric(worker.health_port, "chat_actors_fenced_model_calls") == {"": 1.0}
    entries = [f for _, f in rds.xrange(keys.stream)]
    assert [f["event"] for f in entries] == ["started", "provider"]  # nothing more of it
    row = job_row(db, req["jobId"])
    assert (row["status"], row["attempt"], row["lease_owner"]) == ("running", 2, "elsewhere")


# --- signed reasoning, kept whole, whatever the vendor streams ------------------------------


@pytest.mark.parametrize("block", [
    None, "thinking", ["thinking"], {"type": "thinking", "index": True, "thinking": "x"},
    {"type": "thinking", "index": "0", "thinking": "x"}, {"type": "redacted_thinking", "data": 5},
    {"type": "redacted_thinking", "data": ""}, {"type": "thinking", "thinking": ["x"]},
    {"type": "thinking", "signature": {"s": 1}}, {"type": "tool_use", "index": 0},
    {"type": "thinking", "index": 0},
])
def test_a_hostile_thinking_block_from_the_vendor_is_ignored(block):
    from actors.adapters.llm.chat import _thinking_piece

    assert _thinking_piece(block) is None


def test_only_whole_blocks_are_kept_in_the_vendors_order():
    from actors.adapters.llm.chat import _thinking_piece
    from actors.job.provider import _ThinkingBlocks

    blocks = _ThinkingBlocks()
    for raw in ({"type": "thinking", "thinking": "Let me ", "index": 1},
                {"type": "redacted_thinking", "data": "opaque", "index": 0},
                {"type": "thinking", "thinking": "think.", "index": 1},
                {"type": "thinking", "thinking": "", "signature": "sig-1", "index": 1},
                {"type": "redacted_thinking", "data": "muddle", "index": 1},  # kind changed
                {"type": "thinking", "thinking": "never signed", "index": 2}):
        piece = _thinking_piece(raw)
        assert piece is not None
        blocks.add(piece)
    assert blocks.whole() == [{"type": "redacted_thinking", "data": "opaque"},
                              {"type": "thinking", "thinking": "Let me think.",
                               "signature": "sig-1"}]


@pytest.mark.parametrize("model", ["anthropic/claude-sonnet-4-5", "mistral/mistral-small-latest"])
@pytest.mark.parametrize("kind", BROKEN_HTTP)
async def test_broken_http_through_litellms_routes_is_never_an_empty_answer(
        kind, model, make_config, llm, rds):
    """LiteLLM makes up a finished, empty stream from some broken bodies (gzip the
    vendor sent unasked): a stream that said nothing, not even its usage, is retried
    like any broken stream, and the job ends with the whole answer."""
    config, _ = make_config(environ=_alias("v", model, llm.url))
    llm.queue(Reply(raw=BROKEN_HTTP[kind]))
    llm.default = Reply(tokens=TOKENS)
    req = request("hello", model="v")
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    final = [e["data"]["text"] for e in events if e["event"] == "final"]
    assert final == [FULL] and len(llm.calls) == 2


# --- each vendor's refusal of a prefill, as LiteLLM hands it on -----------------------------

PREFILL = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The sky"}]


@pytest.mark.parametrize("text", [
    'litellm.BadRequestError: AnthropicException - b\'{"type":"error","error":{"type":'
    '"invalid_request_error","message":"This model does not support assistant message '
    'prefill. The conversation must end with a user message."}}\'',
    "litellm.BadRequestError: BedrockException - The model returned the following errors: "
    "This model does not support assistant message prefill. The conversation must end "
    "with a user message.",
    'litellm.BadRequestError: MistralException - {"object":"error","message":"Expected last '
    'role User or Tool (or Assistant with prefix True) for serving but got assistant",'
    '"type":"invalid_request_message_order","param":null,"code":"3230"}',
    "litellm.BadRequestError: DeepseekException - The last message of deepseek-reasoner "
    "must be a user message, or an assistant message with prefix mode on",
    "litellm.BadRequestError: GeminiException BadRequestError - Requests ending with a "
    "model turn are not supported.",
    "litellm.BadRequestError: VertexAIException BadRequestError - Please ensure that "
    "multiturn requests ends with a user role or a function response.",
])
def test_each_vendors_refusal_of_a_prefill_is_recognised(text):
    from actors.adapters.llm.prefill import refused_prefill
    from actors.errors import PermanentError, PrefillRefused

    assert isinstance(refused_prefill(PermanentError(text, code="bad_request"), PREFILL),
                      PrefillRefused)
    # The same words for a request that sent no prefill are the vendor's error as it is.
    assert type(refused_prefill(PermanentError(text, code="bad_request"), PREFILL[:1])) is \
        PermanentError


@pytest.mark.parametrize(("text", "code"), [
    ("litellm.ContextWindowExceededError: prompt is too long: 210000 tokens", "context_length"),
    ("litellm.BadRequestError: AnthropicException - temperature is deprecated for this model",
     "bad_request"),
    ("litellm.AuthenticationError: invalid x-api-key", "auth"),
    ("the model stream stalled for 30 s (idle_timeout)", "bad_request"),
])
def test_other_refusals_of_a_continuation_are_not_taken_for_a_refused_prefill(text, code):
    from actors.adapters.llm.prefill import refused_prefill
    from actors.errors import PermanentError

    error = PermanentError(text, code=code)
    assert refused_prefill(error, PREFILL) is error
