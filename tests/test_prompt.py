"""Building messages inside the context window (tiktoken counts)."""

from __future__ import annotations

import pytest

from actors.adapters.tokens import TokenCounter
from actors.errors import PermanentError
from actors.prompt import build_messages
from messages.mailboxes import Turn

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
