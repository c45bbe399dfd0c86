"""Building the messages sent to the model, within its context window.

Budget = context_window - answer budget. The system prompt and the new user
message are always kept; history turns are added newest first until the next
one would not fit, so the oldest turns are dropped first. A history that would
start with an assistant turn loses that turn too (a reply to nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from actors.errors import PermanentError
from messages.mailboxes import Turn

# Chat formats wrap every message in a few tokens of markup (OpenAI: ~4), and
# prime the reply with ~3. Counted so the budget holds on real servers.
PER_MESSAGE_TOKENS = 4
REPLY_PRIMING_TOKENS = 3


def sources_message(sources: Sequence[tuple[str, str]], *, budget_tokens: int,
                    count: Callable[[str], int]) -> tuple[str, int]:
    """The retrieved chunks as one system message, best first, within `budget_tokens`.

    Returns the text and how many sources it holds; each is tagged [n] (source).
    """
    text = "Answer from these sources when they are relevant, and cite them as [n].\n"
    kept = 0
    for label, chunk in sources:
        block = f"\n[{kept + 1}] ({label})\n{chunk}\n"
        if count(text + block) > budget_tokens:
            break
        text += block
        kept += 1
    return (text if kept else ""), kept


def build_messages(*, system_prompt: str, history: Sequence[Turn], user_message: str,
                   context_window: int, answer_tokens: int, count: Callable[[str], int],
                   context: str = "") -> tuple[list[dict[str, str]], int]:
    """Return (messages, prompt token estimate); raise PermanentError if the message alone overflows."""
    budget = context_window - answer_tokens - REPLY_PRIMING_TOKENS
    head: list[dict[str, str]] = []
    used = 0
    for text in (system_prompt, context):  # context: retrieved sources, in RAG mode
        if text:
            head.append({"role": "system", "content": text})
            used += count(text) + PER_MESSAGE_TOKENS
    used += count(user_message) + PER_MESSAGE_TOKENS
    if used > budget:
        raise PermanentError(
            f"the message needs {used} tokens with the system prompt; the model's window leaves "
            f"{budget} after reserving {answer_tokens} for the answer", code="context_length")
    kept: list[Turn] = []
    for turn in reversed(history):
        cost = count(turn.content) + PER_MESSAGE_TOKENS
        if used + cost > budget:
            break
        used += cost
        kept.append(turn)
    kept.reverse()
    while kept and kept[0].role == "assistant":
        used -= count(kept.pop(0).content) + PER_MESSAGE_TOKENS
    messages = head + [{"role": t.role, "content": t.content} for t in kept]
    messages.append({"role": "user", "content": user_message})
    return messages, used + REPLY_PRIMING_TOKENS
