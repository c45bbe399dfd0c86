"""Seamless takeover (contract 3.3): a job another worker was running continues its answer.

On the real local stack: a worker SIGKILLed mid-answer, and one drained by SIGTERM past
shutdown.grace_s, each followed by a second worker that continues the answer; each case
where continuing is not safe starts over and says why. Then the pure decision
(actors/job/takeover.py) against stream contents a worker, a failover or an attacker
could leave behind.
"""

from __future__ import annotations

import json
import signal

import msgspec
import pytest
import trio

from actors.adapters.llm.tokens import TiktokenCounting
from actors.job.continuing import decide
from actors.job.takeover import MAX_COUNT, attempts, earlier_usage, plan
from messages.ports import Handed, Streamed, TokenCounts
from messages.wire import Restarts, Resumes
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
from tests.scripted_llm import Reply
from tests.test_job_lifecycle import process_streaming

TOKENS = tuple(f"w{i} " for i in range(40))
FULL = "".join(TOKENS)
PRICES = {"CHAT_ACTORS__LLM__MODELS__SCRIPTED__INPUT_COST_PER_TOKEN": "0.0001",
          "CHAT_ACTORS__LLM__MODELS__SCRIPTED__OUTPUT_COST_PER_TOKEN": "0.001"}


def _streamed(rds, config, job_id: str, attempt: int = 1, event: str = "token") -> str:
    """The text of `attempt`'s `event` entries now in the job's stream."""
    return "".join(json.loads(f["data"])["text"]
                   for _, f in rds.xrange(config.job_keys(job_id).stream)
                   if f["event"] == event and f["attempt"] == str(attempt))


def _check_continued(events, llm, db, job_id: str, *, kept: str, carried: str) -> None:
    """Attempt 2 kept `kept` (what clients had of attempt 1), gave the vendor `carried`
    as the answer's start, and streamed only what follows `kept`."""
    started = [e for e in events if e["event"] == "started"]
    assert [s["data"]["attempt"] for s in started] == [1, 2]
    assert started[1]["data"]["resumes"] == {"attempt": 1, "chars": len(kept)}
    assert "restarts" not in started[1]["data"]
    final = next(e["data"] for e in events if e["event"] == "final")
    assert assembled(events).text == final["text"] == FULL
    second = "".join(e["data"]["text"] for e in events
                     if e["event"] == "token" and e["attempt"] == "2")
    assert second == FULL[len(kept):]  # the kept prefix is never streamed again
    # The vendor gets the text without the whitespace it ends with (vendors refuse it).
    assert llm.calls[1].messages[-1] == {"role": "assistant", "content": carried.rstrip()}
    assert [e["event"] for e in events].count("done") == 1
    row = job_row(db, job_id)
    assert (row["status"], row["attempt"], row["handed"]) == ("completed", 2, None)
    answers = [m["content"] for m in message_rows(db, job_id) if m["role"] == "assistant"]
    assert answers == [FULL]  # the history holds the answer once
    # Usage counts both attempts: the second call as the vendor reported it (its prompt
    # holds the carried text), the first estimated (its prompt and its text).
    count = TiktokenCounting().counter("openai/scripted-model")
    vendor_prompt = sum(len(str(m["content"]).split()) for m in llm.calls[1].messages)
    usage = final["usage"]
    assert usage["completionTokens"] == llm.calls[1].tokens_sent + count(carried)
    # The answer's budget (the alias's max_tokens, 256) counts the text carried over.
    assert llm.calls[1].body["max_tokens"] == 256 - count(carried)
    assert usage["promptTokens"] > vendor_prompt >= len(carried.split())
    assert final["costUsd"] == pytest.approx(
        usage["promptTokens"] * 0.0001 + usage["completionTokens"] * 0.001)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage["promptTokens"], usage["completionTokens"])


async def test_sigkill_mid_answer_the_next_worker_continues_it(make_config, llm, rds, db,
                                                                tmp_path):
    config, path = make_config(extra="[jobs]\nlease_s = 2\n", environ=PRICES)
    llm.default = Reply(tokens=TOKENS, token_delay_s=0.1, continues=True)
    req = request("interrupted")
    async with process_streaming(config, path, tmp_path / "worker.log", llm, req, 1,
                                 **PRICES) as worker:
        await until(lambda: len(_streamed(rds, config, req["jobId"]).split()) >= 5, 60)
        worker.kill()
        worker.wait()
    kept = _streamed(rds, config, req["jobId"])  # all attempt 1 ever wrote
    assert job_row(db, req["jobId"])["status"] == "running"

    async with worker_running(config):
        events = await events_of(rds, config, req["jobId"])
    _check_continued(events, llm, db, req["jobId"], kept=kept, carried=kept)


async def test_sigterm_past_the_grace_hands_the_answer_back_and_the_next_worker_continues(
        make_config, llm, rds, db, tmp_path):
    config, path = make_config(environ=PRICES)
    path.write_text(path.read_text().replace("grace_s = 5", "grace_s = 1"))
    llm.default = Reply(tokens=TOKENS, token_delay_s=0.1, continues=True)
    req = request("drained")
    async with process_streaming(config, path, tmp_path / "worker.log", llm, req, 1,
                                 **PRICES) as worker:
        await until(lambda: len(_streamed(rds, config, req["jobId"]).split()) >= 5, 60)
        worker.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(lambda: worker.wait(60))
    assert code == 0
    row = job_row(db, req["jobId"])
    assert (row["status"], row["lease_owner"]) == ("queued", None)
    handed = msgspec.convert(row["handed"], Handed)
    kept = _streamed(rds, config, req["jobId"])
    # The drain kept the answer so far: all clients saw, and any text still on its way.
    assert handed.attempt == 1 and handed.reason is None
    assert handed.text.startswith(kept) and FULL.startswith(handed.text)
    assert handed.usage.completion > 0 and handed.cost_usd and handed.cost_usd > 0

    async with worker_running(config):
        events = await events_of(rds, config, req["jobId"])
    _check_continued(events, llm, db, req["jobId"], kept=kept, carried=handed.text)


# Each case where continuing is not safe: what attempt 1 streams before its worker is
# stopped (it waits there), the request's fields, and the reason attempt 2 gives.
FALLBACKS = {
    "vendor": (Reply(tokens=TOKENS[:6], pause_after=6, pause_s=30), {"model": "priced"}),
    "tool_call": (Reply(tokens=("Let me look. ",), tool_calls=(("call_1", "lookup", ('{"q"',)),),
                        after_tools=("…",), pause_after=4, pause_s=30),
                  {"v": 2, "tools": [{"name": "lookup", "parameters": {"type": "object"}}]}),
    "reasoning": (Reply(tokens=(), reasoning=("Thinking", " about it"), pause_after=2,
                        pause_s=30), {}),
    "split_character": (Reply(tokens=("Caf", "\ufffd"), pause_after=2, pause_s=30), {}),
    "think_block": (Reply(tokens=("<think>", "Let me see"), pause_after=2, pause_s=30), {}),
}


def _stopped_at(rds, config, job_id: str, reason: str) -> bool:
    """Attempt 1's worker has handled everything sent before the vendor's pause."""
    if reason == "reasoning":
        return _streamed(rds, config, job_id, event="reasoning") == "Thinking about it"
    return _streamed(rds, config, job_id).endswith(("w5 ", "…", "\ufffd", "Let me see"))


@pytest.mark.parametrize("reason", list(FALLBACKS))
async def test_each_unsafe_case_starts_over_and_says_why(reason, make_config, llm, rds, db):
    # No grace: leaving the first worker's block hands the job back at once.
    config, _ = make_config(environ={"CHAT_ACTORS__SHUTDOWN__GRACE_S": "0",
                                     "CHAT_ACTORS__LLM__MODELS__SCRIPTED__TOOLS": "true"})
    first, fields = FALLBACKS[reason]
    llm.queue(first)
    llm.default = Reply(tokens=TOKENS, continues=True)
    req = request("unsafe to continue", **fields)
    async with worker_running(config):  # leaving it drains, then hands the job back
        produce(config, req)
        await until(lambda: _stopped_at(rds, config, req["jobId"], reason), 60)
    assert job_row(db, req["jobId"])["status"] == "queued"

    async with worker_running(config):
        events = await events_of(rds, config, req["jobId"])
    started = [e["data"] for e in events if e["event"] == "started"]
    assert started[1]["restarts"] == {"attempt": 1, "reason": reason}
    assert "resumes" not in started[1]
    assert llm.calls[1].messages[-1]["role"] == "user"  # nothing carried to the vendor
    final = next(e["data"] for e in events if e["event"] == "final")
    assert assembled(events).text == final["text"] == FULL
    assert [e["event"] for e in events].count("done") == 1
    assert job_row(db, req["jobId"])["status"] == "completed"


# --- the decision, on what a stream can hold --------------------------------------------


def _entry(event: str, attempt: int, seq: int, **data: object) -> Streamed:
    return Streamed(event=event, attempt=attempt, seq=seq, data=json.dumps(data))


def _started(attempt: int, resumes: dict[str, int] | None = None) -> Streamed:
    data: dict[str, object] = {"model": "m", "mode": "gen", "attempt": attempt}
    if resumes is not None:
        data["resumes"] = resumes
    return Streamed(event="started", attempt=attempt, seq=0, data=json.dumps(data))


def _tokens(attempt: int, *texts: str, first_seq: int = 1) -> list[Streamed]:
    return [_entry("token", attempt, first_seq + n, text=t) for n, t in enumerate(texts)]


def test_a_stream_is_continued_from_all_its_contiguous_text():
    entries = [_started(1), *_tokens(1, "Hello", ", wor")]
    found = plan(2, entries, None, continues=True)
    assert (found.text, found.unseen, found.resumes, found.restarts) == (
        "Hello, wor", "", Resumes(attempt=1, chars=10), None)
    assert found.unbilled == [("", "Hello, wor")]


def test_text_stops_at_the_first_gap_and_counts_a_repeated_entry_once():
    entries = [_started(1), *_tokens(1, "a", "b"), _tokens(1, "b")[0],
               *_tokens(1, "d", first_seq=4)]  # seq 3 is missing
    assert attempts(entries, 2)[1].text == "ab"
    assert plan(2, entries, None, continues=True).resumes == Resumes(attempt=1, chars=2)


def test_a_chain_of_takeovers_assembles_like_a_client():
    entries = [_started(1), *_tokens(1, "one ", "two "),
               _started(2, {"attempt": 1, "chars": 4}), *_tokens(2, "deux ")]
    found = plan(3, entries, None, continues=True)
    assert (found.text, found.resumes) == ("one deux ", Resumes(attempt=2, chars=9))
    # Each dead attempt's own text is estimated once, with the text it continued.
    assert found.unbilled == [("", "one two "), ("one ", "deux ")]
    count = len
    assert earlier_usage(found, 100, count) == [TokenCounts(prompt=100, completion=8),
                                               TokenCounts(prompt=104, completion=5)]


def test_a_handed_back_answer_sends_clients_only_what_they_lack():
    entries = [_started(1), *_tokens(1, "Hello")]
    handed = Handed(attempt=1, text="Hello, world", usage=TokenCounts(prompt=9, completion=3),
                    cost_usd=0.5)
    found = plan(2, entries, handed, continues=True)
    assert (found.text, found.unseen, found.resumes) == (
        "Hello, world", ", world", Resumes(attempt=1, chars=5))
    assert (found.handed_usage, found.handed_cost, found.unbilled) == (
        TokenCounts(prompt=9, completion=3), 0.5, [])  # the drain reported its usage


def test_a_lost_stream_resends_a_handed_back_answer_whole_or_starts_over():
    handed = Handed(attempt=1, text="kept in Postgres")
    for entries in ([], None, [_tokens(1, "x")[0]]):  # expired, shared, its start trimmed
        found = plan(2, entries, handed, continues=True)
        assert (found.text, found.unseen, found.resumes) == (
            "kept in Postgres", "kept in Postgres", Resumes(attempt=1, chars=0))
    assert plan(2, None, None, continues=True).restarts == Restarts(attempt=1,
                                                                    reason="stream_lost")
    trimmed = plan(2, _tokens(1, "x"), None, continues=True)
    assert trimmed.restarts == Restarts(attempt=1, reason="stream_lost")


@pytest.mark.parametrize(("entries", "handed", "continues", "reason"), [
    ([_started(1), *_tokens(1, "text")], None, False, "vendor"),
    ([_started(1), *_tokens(1, "Let me call"),
      _entry("tool_call", 1, 2, index=0, id="c", name="f", arguments="{}")], None, True,
     "tool_call"),
    ([_started(1), *_tokens(1, "a")], Handed(attempt=1, text="a", reason="tool_call"), True,
     "tool_call"),
    ([_started(1), *_tokens(1, "Sure"), _entry("reasoning", 1, 2, text="hmm")], None, True,
     "reasoning"),
    ([_started(1)], Handed(attempt=1, text="", reason="reasoning"), True, "reasoning"),
    ([_started(1), *_tokens(1, "caf\ufffd")], None, True, "split_character"),
    ([_started(1)], Handed(attempt=1, text="na\ufffd"), True, "split_character"),
    ([_started(1), *_tokens(1, "<think>plan", " more")], None, True, "think_block"),
    ([_started(1), *_tokens(1, "ok <Thinking>x</thinking> and <think>y")], None, True,
     "think_block"),
    ([_started(1), *_tokens(1, "answer </thi")], None, True, "think_block"),
    ([_started(1)], None, True, "nothing_streamed"),
    ([], None, True, "nothing_streamed"),
    ([_started(1), *_tokens(1, "a")], Handed(attempt=1, text="a", reason="from a newer "
                                                                          "version"), True,
     "stream_lost"),
])
def test_unsafe_texts_start_over_with_their_reason(entries, handed, continues, reason):
    found = plan(2, entries, handed, continues=continues)
    assert (found.text, found.resumes) == ("", None)
    assert found.restarts == Restarts(attempt=1, reason=reason)


def test_texts_that_look_unsafe_but_are_not_are_continued():
    for text in ("<think>done</think> The answer", "a < b", "x <br", "emoji 😀", "é"):
        entries = [_started(1), *_tokens(1, text)]
        assert plan(2, entries, None, continues=True).resumes == Resumes(
            attempt=1, chars=len(text)), text


def test_hostile_entries_never_continue_on_a_guess():
    hostile = [
        [Streamed(event="started", attempt=1, seq=0, data="not json"), *_tokens(1, "x")],
        [_started(1), Streamed(event="token", attempt=1, seq=1, data='{"text": 5}')],
        [_started(1, {"attempt": 1, "chars": 3}), *_tokens(1, "x")],  # resumes itself
        [_started(1), *_tokens(1, "ab"), _started(2, {"attempt": 1, "chars": 99}),
         *_tokens(2, "c")],  # keeps more than there was
        [_started(1), *_tokens(1, "ab"), _started(2, {"attempt": 1, "chars": -1})],
    ]
    for entries in hostile:
        found = plan(3, entries, None, continues=True)
        assert found.resumes is None or found.text == "", entries
    # Entries of this attempt or later, and a handed-back row of a later attempt, are
    # not the past: they are left out.
    future = [_started(3), *_tokens(3, "later")]
    assert plan(3, future, Handed(attempt=3, text="later"), continues=True).restarts == \
        Restarts(attempt=2, reason="nothing_streamed")


def test_an_answer_whose_final_was_streamed_is_settled_not_continued():
    final = {"text": "Hello, world", "finishReason": "stop", "model": "m", "costUsd": 0.25,
             "usage": {"promptTokens": 7, "completionTokens": 4, "totalTokens": 11}}
    entries = [_started(1), *_tokens(1, "Hello", ", world"), _entry("final", 1, 3, **final)]
    for continues in (True, False):  # nothing is asked of the vendor either way
        found = plan(2, entries, None, continues=continues)
        assert found.complete is not None and found.complete.text == "Hello, world"
        assert (found.resumes, found.unseen, found.unbilled) == (
            Resumes(attempt=1, chars=12), "", [])
        assert (found.handed_usage, found.handed_cost) == (
            TokenCounts(prompt=7, completion=4), 0.25)
    # Counts read back are kept within what a row holds, whatever the stream says.
    hostile = {**final, "costUsd": -3.0, "usage": {"promptTokens": -5, "completionTokens": 10**15,
                                                  "totalTokens": 0, "cachedTokens": 99},
               "retries": -4, "fallbacks": 10**12}
    found = plan(2, [_started(1), _entry("final", 1, 1, **hostile)], None, continues=True)
    assert found.complete is not None
    assert (found.complete.retries, found.complete.fallbacks) == (0, MAX_COUNT)
    assert found.handed_usage is not None and found.handed_usage.prompt == 0
    assert found.handed_usage.cached == 0 and 0 < found.handed_usage.completion <= 10**8
    assert (found.handed_cost, found.unseen) == (0.0, "Hello, world")
    # A `final` that is not one is ignored: the text streamed is continued.
    broken = [_started(1), *_tokens(1, "Hi"), _entry("final", 1, 2, text=3)]
    assert plan(2, broken, None, continues=True).complete is None


async def test_a_mistral_alias_marks_the_carried_text_as_a_prefix(make_config, llm, rds, db):
    """Mistral refuses a trailing assistant turn unless it says `prefix: true` (so do
    DeepSeek's prefix completions): through LiteLLM's own Mistral route, the continued
    turn carries the flag; an OpenAI-wire vendor, which may refuse the key, never gets it."""
    mistral = {"CHAT_ACTORS__LLM__MODELS__MISTRAL__MODEL": "mistral/mistral-small-latest",
               "CHAT_ACTORS__LLM__MODELS__MISTRAL__API_BASE": llm.url,
               "CHAT_ACTORS__LLM__MODELS__MISTRAL__API_KEY_ENV": "SCRIPTED_LLM_KEY",
               "CHAT_ACTORS__SHUTDOWN__GRACE_S": "0"}
    config, _ = make_config(environ=mistral)
    llm.queue(Reply(tokens=TOKENS[:6], pause_after=6, pause_s=30))
    llm.default = Reply(tokens=TOKENS, continues=True)
    req = request("continue in French", model="mistral")
    async with worker_running(config):
        produce(config, req)
        await until(lambda: _streamed(rds, config, req["jobId"]).endswith("w5 "), 60)
    async with worker_running(config):
        events = await events_of(rds, config, req["jobId"])
    kept = "".join(TOKENS[:6])
    assert llm.calls[1].messages[-1] == {"role": "assistant", "content": kept.rstrip(),
                                         "prefix": True}
    assert assembled(events).text == FULL
    assert [e["data"].get("resumes") for e in events if e["event"] == "started"] == [
        None, {"attempt": 1, "chars": len(kept)}]


# --- the one decision itself (actors/job/continuing.py) ---------------------------------------


@pytest.mark.parametrize(("text", "kwargs", "outcome", "reason"), [
    ("The sky is", {"continues": True}, "continue", None),
    ("The sky is", {"continues": False}, "restart", "vendor"),
    ("The sky is", {"continues": True, "refused": True}, "restart", "vendor_refused"),
    ("", {"continues": True}, "restart", "nothing_streamed"),
    ("Let me look", {"continues": True, "midway": "tool_call"}, "restart", "tool_call"),
    ("", {"continues": False, "midway": "reasoning"}, "restart", "reasoning"),
    ("Caf\ufffd", {"continues": True}, "restart", "split_character"),
    ("a <think> b", {"continues": True}, "restart", "think_block"),
    # A user who asked for this very answer to go on: an alias that cannot take it as a
    # prefill gets it as an instruction; nothing else changes.
    ("The sky is", {"continues": False, "asked": True}, "instruction", "vendor"),
    ("The sky is", {"continues": True, "refused": True, "asked": True}, "instruction",
     "vendor_refused"),
    ("The sky is", {"continues": True, "asked": True}, "continue", None),
    ("Let me", {"continues": False, "midway": "tool_call", "asked": True}, "restart",
     "tool_call"),
])
def test_the_decision_on_every_interrupted_answer(text, kwargs, outcome, reason):
    found = decide(text, **kwargs)
    assert (found.outcome, found.reason) == (outcome, reason)


def test_a_refused_prefill_restarts_a_takeover_with_its_own_reason():
    entries = [_started(1), *_tokens(1, "Hello, wor")]
    found = plan(2, entries, None, continues=False, refused=True)
    assert found.restarts == Restarts(attempt=1, reason="vendor_refused") and not found.text
