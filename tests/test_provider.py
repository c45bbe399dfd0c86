"""Retries, fallbacks and continuation, with the scripted ChatModel port and virtual time."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from actors.aliases import Alias, Aliases
from actors.errors import (
    PermanentError,
    PrefillRefused,
    ProviderExhausted,
    Stalled,
    TransientError,
)
from actors.job.provider import Answer, Draft, continuation, stream_answer
from config import Config, load_config
from tests.fakes import FlatPricing, Reply, ScriptedChat, WordCounting

CONFIG = load_config(environ={
    "CHAT_ACTORS__LLM__MODELS__LOCAL__FALLBACKS": '["backup"]',
    "CHAT_ACTORS__LLM__MODELS__BACKUP__MODEL": "openai/backup-model",
    "CHAT_ACTORS__LLM__RETRIES": "2",
    "CHAT_ACTORS__LLM__RETRY_BACKOFF_S": "1",
    "CHAT_ACTORS__JOBS__FIRST_TOKEN_TIMEOUT_S": "10",
    "CHAT_ACTORS__JOBS__IDLE_TIMEOUT_S": "5",
})


def local_chain(config: Config) -> tuple[Alias, ...]:
    """The alias "local" and its fallbacks, resolved as a worker resolves them."""
    return Aliases.resolve(config, FlatPricing(), WordCounting()).chain("local")


MESSAGES = [{"role": "user", "content": "hi"}]


async def run(chat: ScriptedChat, mailbox_full_s: float = 0.0, config: Config = CONFIG,
              **listeners: Any) -> tuple[Answer, list[str], list[tuple[str, str, str]]]:
    """Stream an answer from `chat`; the job's event mailbox takes no event for
    `mailbox_full_s` when the first one comes (Redis slow)."""
    streamed: list[str] = []
    switches: list[tuple[str, str, str]] = []

    async def on_token(text):
        if not streamed:
            await trio.sleep(mailbox_full_s)
        streamed.append(text)

    async def on_switch(old, new, why):
        switches.append((old, new, why))

    answer = await stream_answer(chat=chat, pricing=FlatPricing(), config=config,
                                 chain=local_chain(config), messages=MESSAGES, params={},
                                 count=lambda text: len(text.split()), prompt_estimate=3,
                                 on_token=on_token, on_switch=on_switch, **listeners)
    return answer, streamed, switches


async def test_a_429_is_retried_after_its_retry_after(autojump_clock):
    chat = ScriptedChat([Reply(error=TransientError("429", retry_after=7)),
                         Reply(tokens=("ok",))])
    answer, streamed, switches = await run(chat)
    assert answer.text == "ok" and streamed == ["ok"] and answer.alias == "local"
    assert chat.calls[1].at - chat.calls[0].at >= 7
    assert switches == [("local", "local", "429")]


async def test_after_the_retries_the_fallback_answers(autojump_clock):
    chat = ScriptedChat([Reply(error=TransientError("500"))] * 3
                        + [Reply(tokens=("from", " backup"))])
    answer, _, switches = await run(chat)
    assert [call.model for call in chat.calls] == ["openai/smollm2"] * 3 + ["openai/backup-model"]
    assert switches[-1] == ("local", "backup", "500")
    assert answer.alias == "backup" and answer.text == "from backup"
    assert answer.finished is not None and answer.tries == 4


async def test_a_broken_stream_is_continued_not_restarted(autojump_clock):
    chat = ScriptedChat([Reply(tokens=("The", " sky"),
                               error=TransientError("connection reset")),
                         Reply(tokens=(" is", " blue."))])
    answer, streamed, _ = await run(chat)
    assert "".join(streamed) == "The sky is blue."  # the client saw one consistent text
    assert answer.text == "The sky is blue."
    assert chat.calls[1].messages == MESSAGES + [{"role": "assistant", "content": "The sky"}]


async def test_a_stall_is_retried(autojump_clock):
    chat = ScriptedChat([Reply(tokens=("a",), hang=True), Reply(tokens=("b",))])
    answer, _, switches = await run(chat)
    assert answer.text == "ab"
    assert "idle_timeout" in switches[0][2]
    assert chat.calls[1].at - chat.calls[0].at >= 5


async def test_a_token_that_arrives_after_the_job_gave_up_on_a_stall_is_not_a_crash(
        autojump_clock):
    """Seen on a worker woken from SIGSTOP: every deadline had passed, so the stall
    fired while the vendor's next token was already on its way to the mailbox."""
    chat = ScriptedChat([Reply(late_s=CONFIG.jobs.first_token_timeout_s + 1),
                         Reply(tokens=("b",))])
    answer, _, switches = await run(chat)
    assert answer.text == "b" and "first_token_timeout" in switches[0][2]


async def test_permanent_errors_fail_fast(autojump_clock):
    chat = ScriptedChat([Reply(error=PermanentError("401 bad key", code="auth")),
                         Reply(tokens=("x",))])
    with pytest.raises(PermanentError, match="bad key"):
        await run(chat)
    assert len(chat.calls) == 1


async def test_when_everything_fails_the_last_failure_is_reported(autojump_clock):
    chat = ScriptedChat([Reply(hang=True)] * 6)
    with pytest.raises(ProviderExhausted) as info:
        await run(chat)
    assert isinstance(info.value.last, Stalled) and info.value.last.code == "first_token_timeout"
    assert len(chat.calls) == 6  # 3 tries of local, 3 of backup


def test_continuation_leaves_a_fresh_request_alone():
    assert continuation(MESSAGES, "") == MESSAGES


async def test_the_budget_cap_counts_the_answer_the_request_allows_not_the_fallbacks_limit(
        autojump_clock):
    # One try may cost 100 tokens x $0.01 = $1.00, which is what the job reserved. The first
    # try streams 10 tokens ($0.10) and breaks. The fallback's own max_tokens is 5, but the
    # request still asks for up to 100: it could cost $1.00 more, so it must not run.
    priced = {"INPUT_COST_PER_TOKEN": "0", "OUTPUT_COST_PER_TOKEN": "0.01"}
    config = load_config(environ={
        "CHAT_ACTORS__LLM__RETRIES": "0",
        "CHAT_ACTORS__LLM__MODELS__LOCAL__FALLBACKS": '["backup"]',
        "CHAT_ACTORS__LLM__MODELS__LOCAL__MAX_TOKENS": "100",
        "CHAT_ACTORS__LLM__MODELS__BACKUP__MODEL": "openai/backup-model",
        "CHAT_ACTORS__LLM__MODELS__BACKUP__MAX_TOKENS": "5",
        **{f"CHAT_ACTORS__LLM__MODELS__{alias}__{key}": value
           for alias in ("LOCAL", "BACKUP") for key, value in priced.items()}})
    chat = ScriptedChat([Reply(tokens=tuple(f"t{i} " for i in range(10)),
                             error=TransientError("connection reset")),
                         Reply(tokens=("never",))])
    draft = Draft()

    async def ignore(*args):
        pass

    with pytest.raises(ProviderExhausted):
        await stream_answer(chat=chat, pricing=FlatPricing(), config=config, chain=local_chain(config),
                            messages=MESSAGES,
                            params={"max_tokens": 100}, count=lambda text: len(text.split()),
                            prompt_estimate=0, on_token=ignore, on_switch=ignore, draft=draft,
                            spend_cap=1.0)
    assert len(chat.calls) == 1 and draft.answer().spent.cost_usd == pytest.approx(0.10)


def resending() -> ScriptedChat:
    """A transport whose kept-alive connection was lost before any answer: it asks to
    send the request again, and does so only if told yes."""
    return ScriptedChat([Reply(resend="kept-alive connection lost; sent again",
                               tokens=("ok",))])


async def test_a_resent_request_counts_as_a_retry(autojump_clock):
    chat = resending()
    answer, _, switches = await run(chat)
    assert chat.resends == [True] and answer.text == "ok"
    assert answer.retries == 1  # the first may have reached the vendor
    assert switches == [("local", "local", "kept-alive connection lost; sent again")]


async def test_a_request_is_not_resent_past_the_budget_cap(autojump_clock):
    # One try may cost 100 tokens x $0.01 = $1.00; the job reserved $0.50.
    config = load_config(environ={
        "CHAT_ACTORS__LLM__RETRIES": "0",
        "CHAT_ACTORS__LLM__MODELS__LOCAL__MAX_TOKENS": "100",
        "CHAT_ACTORS__LLM__MODELS__LOCAL__INPUT_COST_PER_TOKEN": "0",
        "CHAT_ACTORS__LLM__MODELS__LOCAL__OUTPUT_COST_PER_TOKEN": "0.01"})
    chat, draft = resending(), Draft()

    async def ignore(*args):
        pass

    with pytest.raises(ProviderExhausted):
        await stream_answer(chat=chat, pricing=FlatPricing(), config=config, chain=local_chain(config),
                            messages=MESSAGES, params={"max_tokens": 100},
                            count=lambda text: len(text.split()), prompt_estimate=0,
                            on_token=ignore, on_switch=ignore, draft=draft, spend_cap=0.5)
    assert chat.resends == [False] and draft.answer().retries == 0


async def test_a_vendor_that_calls_tools_without_end_is_cut_off(autojump_clock):
    """More tool calls than limits.max_tool_calls fails the job with a named error at
    the first one too many: the stream is hung up on, nothing of it is kept, and the
    job is not retried (the same prompt would run away again, billed each time)."""
    limit = CONFIG.limits.max_tool_calls
    chat = ScriptedChat([Reply(tool_calls=("{}",) * (limit + 1), hang=True),
                         Reply(tool_calls=("{}",) * 2)])
    with pytest.raises(PermanentError) as failed:
        await run(chat)
    assert failed.value.code == "tool_calls_too_large"
    assert f"limits.max_tool_calls ({limit})" in str(failed.value)
    assert len(chat.calls) == 1  # no retry, no fallback


async def test_a_vendor_whose_tool_calls_grow_without_end_is_cut_off(autojump_clock):
    """The characters of one answer's tool calls are bounded, all calls together."""
    config = load_config(environ={"CHAT_ACTORS__LIMITS__MAX_TOOL_CALL_CHARS": "100"})

    async def ignore(*args):
        pass

    # 4 calls of 30 characters (id, name, arguments): 120 in all.
    draft, vendor = Draft(), ScriptedChat([Reply(tool_calls=("x" * 27,) * 4, hang=True)])
    with pytest.raises(PermanentError) as failed:
        await stream_answer(chat=vendor, pricing=FlatPricing(), config=config,
                            chain=local_chain(config), messages=MESSAGES, params={}, count=len,
                            prompt_estimate=3, on_token=ignore, on_switch=ignore, draft=draft)
    assert failed.value.code == "tool_calls_too_large"
    assert "limits.max_tool_call_chars (100)" in str(failed.value)
    assert draft.answer().tool_calls == () and len(vendor.sent) == 4


async def test_a_full_event_mailbox_is_not_the_vendors_stall(autojump_clock):
    """The job's event mailbox stays full (Redis slow, a worker just thawed) for three
    idle timeouts while the vendor is healthy: reading pauses, the vendor is neither
    hung up on nor paid for another try, and its stall clock goes on from where it
    stood once the mailbox takes events again."""
    chat = ScriptedChat([Reply(tokens=("one ", "two ", "three "))])
    answer, streamed, switches = await run(chat, mailbox_full_s=CONFIG.jobs.idle_timeout_s * 3)
    assert "".join(streamed) == answer.text == "one two three "
    assert len(chat.calls) == 1 and answer.retries == 0 and switches == []


async def test_a_vendor_silent_after_a_full_mailbox_is_still_a_stall(autojump_clock):
    """The clock stopped only while the mailbox was full: a vendor that then goes
    silent is hung up on after its idle timeout, and the next try continues exactly
    what the client got."""
    chat = ScriptedChat([Reply(tokens=("one ", "two "), hang=True), Reply(tokens=("again ",))])
    answer, streamed, _ = await run(chat, mailbox_full_s=CONFIG.jobs.idle_timeout_s * 3)
    assert "".join(streamed) == answer.text == "one two again "
    # (the prefill without the space the client holds: see the whitespace test below)
    assert len(chat.calls) == 2 and chat.calls[1].messages[-1]["content"] == "one two"


# --- the one continuation decision, inside the worker (contract 3.3) -------------------

NOT_CONTINUING = load_config(environ={
    "CHAT_ACTORS__LLM__MODELS__LOCAL__CONTINUES": "false",
    "CHAT_ACTORS__LLM__RETRIES": "1", "CHAT_ACTORS__LLM__RETRY_BACKOFF_S": "1"})
REFUSED = "AnthropicException - This model does not support assistant message prefill."


class Restarts:
    """The on_restart listener: each (alias, reason), as the job's next attempt."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, alias: str, reason: str) -> None:
        self.seen.append((alias, reason))


async def test_an_alias_that_does_not_continue_starts_the_answer_over_as_a_new_attempt(
        autojump_clock):
    chat = ScriptedChat([Reply(tokens=("The", " sky"),
                               error=TransientError("connection reset")),
                         Reply(tokens=("Hello", " there"))])
    restarts = Restarts()
    answer, streamed, _ = await run(chat, config=NOT_CONTINUING, on_restart=restarts)
    assert restarts.seen == [("local", "vendor")]
    assert chat.calls[1].messages == MESSAGES  # no prefill the alias cannot take
    assert answer.text == "Hello there"  # the first attempt's text is not part of it
    assert "".join(streamed) == "The skyHello there"  # the client was shown both


async def test_a_try_that_showed_the_client_nothing_is_retried_in_the_same_attempt(
        autojump_clock):
    chat = ScriptedChat([Reply(error=TransientError("connection reset")), Reply(tokens=("ok",))])
    restarts = Restarts()
    answer, _, _ = await run(chat, config=NOT_CONTINUING, on_restart=restarts)
    assert restarts.seen == [] and answer.text == "ok"


async def test_a_refused_prefill_restarts_once_and_the_alias_continues_no_more(autojump_clock):
    refused: set[str] = set()
    chat = ScriptedChat([Reply(tokens=("The", " sky"),
                               error=TransientError("connection reset")),
                         Reply(error=PrefillRefused(REFUSED)), Reply(tokens=("Hello",))])
    restarts = Restarts()
    answer, _, _ = await run(chat, on_restart=restarts, refused=refused)
    # Tried once.
    assert chat.calls[1].messages[-1] == {"role": "assistant", "content": "The sky"}
    assert chat.calls[2].messages == MESSAGES
    assert restarts.seen == [("local", "vendor_refused")] and refused == {"local"}
    assert answer.text == "Hello" and answer.retries == 1  # the refusal is no retry
    # The next job of that alias in this process restarts without asking again.
    chat = ScriptedChat([Reply(tokens=("A",), error=TransientError("connection reset")),
                         Reply(tokens=("B",))])
    restarts = Restarts()
    answer, _, _ = await run(chat, on_restart=restarts, refused=refused)
    assert restarts.seen == [("local", "vendor_refused")] and len(chat.calls) == 2
    assert chat.calls[1].messages == MESSAGES and answer.text == "B"


async def test_a_prefill_refused_twice_is_the_vendors_error_not_a_loop(autojump_clock):
    chat = ScriptedChat([Reply(tokens=("The",), error=TransientError("connection reset")),
                         Reply(error=PrefillRefused(REFUSED)),
                         Reply(error=PrefillRefused(REFUSED))])
    with pytest.raises(PrefillRefused):
        await run(chat, on_restart=Restarts(), refused=set())
    assert len(chat.calls) == 3


@pytest.mark.parametrize(("first", "reason"), [
    (Reply(tokens=("Let me", " check"), tool_calls=("{}",), error=TransientError("reset")),
     "tool_call"),
    (Reply(tokens=("Caf", "\ufffd"), error=TransientError("reset")), "split_character"),
    (Reply(tokens=("<think>", "hmm"), error=TransientError("reset")), "think_block"),
])
async def test_each_unsafe_text_restarts_inside_the_worker_too(first, reason, autojump_clock):
    chat = ScriptedChat([first, Reply(tokens=("fine",))])
    restarts = Restarts()
    answer, _, _ = await run(chat, on_restart=restarts)
    assert restarts.seen == [("local", reason)] and answer.text == "fine"
    assert chat.calls[1].messages == MESSAGES


async def test_a_fallback_decides_again_for_its_own_alias(autojump_clock):
    config = load_config(environ={
        "CHAT_ACTORS__LLM__MODELS__LOCAL__FALLBACKS": '["backup"]',
        "CHAT_ACTORS__LLM__MODELS__BACKUP__MODEL": "openai/backup-model",
        "CHAT_ACTORS__LLM__MODELS__BACKUP__CONTINUES": "false",
        "CHAT_ACTORS__LLM__RETRIES": "1", "CHAT_ACTORS__LLM__RETRY_BACKOFF_S": "1"})
    chat = ScriptedChat([Reply(tokens=("The",), error=TransientError("reset")),
                         Reply(tokens=(" sky",), error=TransientError("reset")),
                         Reply(tokens=("Hi",))])
    restarts = Restarts()
    answer, _, _ = await run(chat, config=config, on_restart=restarts)
    assert chat.calls[1].messages[-1] == {"role": "assistant", "content": "The"}  # local continues
    assert restarts.seen == [("backup", "vendor")] and chat.calls[2].messages == MESSAGES
    assert answer.text == "Hi" and answer.alias == "backup"


async def test_whitespace_the_client_holds_is_left_out_of_the_prefill_and_not_sent_twice(
        autojump_clock):
    chat = ScriptedChat([Reply(tokens=("The ",), error=TransientError("reset")),
                         Reply(tokens=(" ", "sky."))])
    answer, streamed, _ = await run(chat)
    assert chat.calls[1].messages[-1] == {"role": "assistant", "content": "The"}
    assert "".join(streamed) == answer.text == "The sky."


async def test_the_fence_is_read_before_every_try(autojump_clock):
    reads: list[int] = []

    async def before_try() -> None:
        reads.append(len(chat.calls))

    chat = ScriptedChat([Reply(error=TransientError("500")), Reply(error=TransientError("500")),
                         Reply(tokens=("ok",))])
    await run(chat, before_try=before_try)
    assert reads == [0, 1, 2]  # each read before its call


async def test_a_fenced_job_makes_no_model_call(autojump_clock):
    chat = ScriptedChat([Reply(error=TransientError("500")), Reply(tokens=("never",))])
    with trio.CancelScope() as scope:
        async def before_try() -> None:
            if chat.calls:  # a later attempt took the job meanwhile: stopped
                scope.cancel()
                await trio.lowlevel.checkpoint()

        await run(chat, before_try=before_try)
    assert scope.cancelled_caught and len(chat.calls) == 1
