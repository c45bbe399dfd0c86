"""Building messages inside the context window (tiktoken counts)."""

from __future__ import annotations

import pytest

from actors.adapters.llm.tokens import TokenCounter
from actors.errors import PermanentError
from actors.job.prompt import build_messages
from messages.mailboxes import CallMade, Turn

count = TokenCounter("openai/gpt-4o-mini").count


def history(n: int) -> list[Turn]:
    turns = []
    for i in range(n):
        turns += [Turn(role="user", content=f"question {i} " + "lorem " * 20),
                  Turn(role="assistant", content=f"answer {i} " + "ipsum " * 20)]
    return turns


def test_everything_is_kept_when_it_fits():
    messages, used = build_messages(system_prompt="Be brief.", history=history(2),
                                    user_message="next?", context_window=8000,
                                    answer_tokens=500, count=count)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user",
                                             "assistant", "user"]
    assert messages[-1] == {"role": "user", "content": "next?"}
    assert used == sum(count(m["content"]) + 4 for m in messages) + 3


def test_oldest_turns_are_dropped_first_within_the_budget():
    window, answer = 300, 100
    messages, used = build_messages(system_prompt="Be brief.", history=history(10),
                                    user_message="next?", context_window=window,
                                    answer_tokens=answer, count=count)
    assert used <= window - answer
    assert messages[0]["role"] == "system" and messages[-1]["content"] == "next?"
    kept = messages[1:-1]
    assert kept[0]["role"] == "user"  # never a reply to a dropped question
    assert kept[-1]["content"].startswith("answer 9")  # the newest turns survive
    assert len(kept) < 20
    # One more turn would not have fitted.
    assert used + count("question 0 " + "lorem " * 20) + 4 > window - answer - 60


def test_a_message_too_long_for_the_window_is_a_permanent_error():
    with pytest.raises(PermanentError) as info:
        build_messages(system_prompt="", history=[], user_message="word " * 500,
                       context_window=300, answer_tokens=100, count=count)
    assert info.value.code == "context_length"


def tool_history(n: int) -> list[Turn]:
    """n exchanges, each: a question, a call of two tools, their results, the answer."""
    turns = []
    for i in range(n):
        calls = [CallMade(f"c{i}a", "lookup", '{"q": "' + "x " * 30 + '"}'),
                 CallMade(f"c{i}b", "lookup", "{}")]
        turns += [Turn(role="user", content=f"question {i} " + "lorem " * 20),
                  Turn(role="assistant", content="", tool_calls=calls),
                  Turn(role="tool", content="result " * 20, tool_call_id=f"c{i}a"),
                  Turn(role="tool", content="result " * 20, tool_call_id=f"c{i}b"),
                  Turn(role="assistant", content=f"answer {i}")]
    return turns


def _valid_for_the_vendor(messages: list[dict]) -> bool:
    """Every call answered right after it, no result without its call, no leading reply."""
    pending: set[str] = set()
    for n, m in enumerate(messages):
        if m["role"] == "tool":
            if m["tool_call_id"] not in pending:
                return False
            pending.discard(m["tool_call_id"])
            continue
        if pending:
            return False
        if m["role"] == "assistant" and messages[n - 1]["role"] == "system":
            return False
        pending = {c["id"] for c in m.get("tool_calls") or ()}
    return not pending


@pytest.mark.parametrize("window", range(560, 1400, 37))
def test_trimming_cuts_whole_tool_call_groups(window):
    messages, used = build_messages(system_prompt="Be brief.", history=tool_history(4),
                                    user_message="next?", context_window=window,
                                    answer_tokens=200, count=count)
    assert _valid_for_the_vendor(messages), messages
    assert used <= window - 200 and messages[-1] == {"role": "user", "content": "next?"}


def test_the_pending_call_always_goes_with_its_results():
    history = tool_history(3)[:-3]  # the last call waits for its results
    results = [Turn(role="tool", content="21 C", tool_call_id="c2a"),
               Turn(role="tool", content="12:00", tool_call_id="c2b")]
    messages, _ = build_messages(system_prompt="", history=history, user_message="",
                                 context_window=700, answer_tokens=200, count=count,
                                 tool_results=results)
    assert _valid_for_the_vendor(messages)
    assert [m["role"] for m in messages[-3:]] == ["assistant", "tool", "tool"]
    assert messages[-1] == {"role": "tool", "tool_call_id": "c2b", "content": "12:00"}


def test_a_call_never_answered_is_left_out():
    """The user moved on without sending the results: that call can never be sent."""
    history = [*tool_history(2)[:7], Turn(role="user", content="never mind, what time is it?"),
               Turn(role="assistant", content="Noon.")]
    messages, _ = build_messages(system_prompt="", history=history, user_message="thanks",
                                 context_window=8000, answer_tokens=200, count=count)
    assert _valid_for_the_vendor(messages)
    assert [c["id"] for m in messages for c in m.get("tool_calls") or ()] == ["c0a", "c0b"]
