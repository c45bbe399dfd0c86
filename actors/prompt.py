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


def build_messages(*, system_prompt: str, history: Sequence[Turn], user_message: str,
                   context_window: int, answer_tokens: int,
                   count: Callable[[str], int]) -> tuple[list[dict[str, str]], int]:
    """Return (messages, prompt token estimate); raise PermanentError if the message alone overflows."""
    budget = context_window - answer_tokens - REPLY_PRIMING_TOKENS
    head: list[dict[str, str]] = []
    used = 0
    if system_prompt:
        head.append({"role": "system", "content": system_prompt})
        used += count(system_prompt) + PER_MESSAGE_TOKENS
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
