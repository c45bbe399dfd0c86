"""continuing: the one decision on an interrupted answer (contract 3.3).

Whenever an answer has to go on from text a client already holds (a retry or a
fallback inside the worker, a takeover on another worker), this says how:

- `continue`: the text goes to the model as the start of the assistant turn and only
  the rest is streamed (`started.resumes` between workers; nothing new within one);
- `restart`: the answer starts over as a new attempt (`started.restarts`, with why);
- `instruction`: the text goes to the model inside the conversation with a request
  to go on from it. Only for a user's explicit "continue this answer" on an alias
  that cannot take a prefill, where starting over would defeat what was asked.

Pure: the text, what the try was in the middle of and what the alias can do come
in, a Decision goes out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from messages.wire import RestartReason

# A text ending inside one of these blocks stops in the model's thinking.
_THINK_OPEN = re.compile(r"<(think|thinking)>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</(think|thinking)>", re.IGNORECASE)
_THINK_TAGS = ("<think>", "<thinking>", "</think>", "</thinking>")

Midway = Literal["tool_call", "reasoning"]


@dataclass(frozen=True)
class Decision:
    outcome: Literal["continue", "restart", "instruction"]
    reason: RestartReason | None = None  # why a restart (or an instruction) was needed


CONTINUE = Decision("continue")


def decide(text: str, *, continues: bool, midway: Midway | None = None,
           refused: bool = False, asked: bool = False) -> Decision:
    """How an answer that stopped at `text` goes on. `continues`: the alias takes a
    trailing assistant turn; `midway`: what the stopped try was in the middle of;
    `refused`: the vendor has just refused that turn; `asked`: the user asked for this
    very answer to be continued (an instruction then stands in for a prefill)."""
    reason = _reason(text, continues=continues and not refused, midway=midway)
    if refused and reason == "vendor":
        reason = "vendor_refused"
    if reason is None:
        return CONTINUE
    if asked and reason in ("vendor", "vendor_refused"):
        return Decision("instruction", reason)
    return Decision("restart", reason)


def _reason(text: str, *, continues: bool, midway: Midway | None) -> RestartReason | None:
    """Why `text` may not be continued; None when it may. What the try was doing comes
    first: a prefill would turn a half-made tool call into prose, or cut a thought."""
    if midway is not None:
        return midway
    if not text:
        return "nothing_streamed"
    if not continues:
        return "vendor"
    if text.endswith("\ufffd"):  # what decoding leaves of a character cut short
        return "split_character"
    opened = [m.end() for m in _THINK_OPEN.finditer(text)]
    closed = [m.end() for m in _THINK_CLOSE.finditer(text)]
    if opened and (not closed or opened[-1] > closed[-1]):
        return "think_block"
    tail = text[-len(max(_THINK_TAGS, key=len)):].lower()
    if any(tag.startswith(tail[i:]) and tag != tail[i:] for tag in _THINK_TAGS
           for i in range(len(tail)) if tail[i] == "<"):
        return "think_block"  # cut inside the tag itself
    return None
