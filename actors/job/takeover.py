"""takeover: what a later attempt of a job carries on from the earlier ones (contract 3.3).

A job comes back as attempt N+1 when its worker stopped mid-answer: a drain past
shutdown.grace_s, a crash, a lease lost. The new attempt reads back what the earlier
attempts streamed (the job's stream, assembled by the client rules: `token` text,
contiguous by `seq`, through each `started.resumes`) and what a drain handed back with
the lease (llm_jobs.handed). When it is safe, it continues that text: the vendor gets
it as the start of the assistant turn, `started.resumes` tells clients how much of it
they keep, and only the rest is streamed. Otherwise it starts over and
`started.restarts` says why:

- `vendor`: the alias's vendor does not continue a trailing assistant turn;
- `tool_call`: the earlier attempt was making a tool call;
- `reasoning`: its reasoning had not finished;
- `split_character`: its text ends inside a character (U+FFFD: bytes of a character
  the vendor cut);
- `think_block`: its text ends inside a `<think>` block;
- `stream_lost`: its stream no longer holds its text, and nothing was handed back;
- `nothing_streamed`: it had streamed no answer text.

An earlier attempt that streamed its `final` had a complete answer (its worker
stopped between Redis and Postgres): the new attempt settles that answer without
calling the model.

Everything here is pure: the stream entries and the handed-back row come in, a Plan
goes out; reading them is the conversation's work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from actors.job.continuing import Midway, decide
from actors.job.spend import within
from messages.ports import Handed, Streamed, TokenCounts
from messages.wire import Final, RestartReason, Restarts, Resumes

MAX_COUNT = 1_000_000  # a settled `final`'s retries, fallbacks, characters removed


class _Text(msgspec.Struct):
    text: str


class _Resumes(msgspec.Struct):
    attempt: int
    chars: int


class _Started(msgspec.Struct):
    resumes: _Resumes | None = None


_decode_text = msgspec.json.Decoder(_Text).decode
_decode_started = msgspec.json.Decoder(_Started).decode
_decode_final = msgspec.json.Decoder(Final).decode


@dataclass(frozen=True)
class Earlier:
    """One earlier attempt as its stream tells it."""

    text: str | None  # what a client assembles of it; None: it cannot (its start is lost)
    own: str = ""  # the text of its own `token` events, up to the first gap
    reasoning_open: bool = False  # reasoning came after its last answer text
    tool_call: bool = False  # it sent a tool call
    final: Final | None = None  # its `final`: the answer was complete


@dataclass(frozen=True)
class Plan:
    """What attempt N+1 carries on: `text`, of which clients keep `resumes.chars`
    characters and are sent the rest (`unseen`) first; or a restart (`text` empty)."""

    attempt: int  # the earlier attempt this one follows
    text: str = ""
    complete: Final | None = None  # that attempt's `final`: this one only settles it
    unseen: str = ""
    resumes: Resumes | None = None
    restarts: Restarts | None = None
    # What the earlier attempts used: handed back exactly, or estimated (below).
    handed_usage: TokenCounts | None = None
    handed_cost: float | None = 0.0
    # (the text it continued, its own text) of each earlier attempt nothing accounts for.
    unbilled: list[tuple[str, str]] = field(default_factory=list[tuple[str, str]])


def attempts(entries: Sequence[Streamed], below: int) -> dict[int, Earlier]:
    """Each attempt before `below` in the stream, as a client following the contract
    assembles it. An entry seen twice counts once; text stops at the first missing or
    unreadable entry, since what followed it is unknown."""
    by_attempt: dict[int, dict[int, Streamed]] = {}
    for entry in entries:
        if 0 < entry.attempt < below and entry.seq >= 0:
            by_attempt.setdefault(entry.attempt, {}).setdefault(entry.seq, entry)
    found: dict[int, Earlier] = {}
    for attempt in sorted(by_attempt):
        entries_by_seq = by_attempt[attempt]
        first = entries_by_seq.get(0)
        base = _base(first, found, attempt)
        parts: list[str] = []
        reasoning_open = tool_call = False
        final: Final | None = None
        seq = 1
        while (entry := entries_by_seq.get(seq)) is not None:
            if entry.event == "token":
                try:
                    parts.append(_decode_text(entry.data).text)
                except msgspec.DecodeError:
                    break
                reasoning_open = False
            elif entry.event == "reasoning":
                reasoning_open = True
            elif entry.event == "tool_call":
                tool_call = True
            elif entry.event == "final":
                with contextlib.suppress(msgspec.DecodeError):
                    final = _decode_final(entry.data)
            seq += 1
        own = "".join(parts)
        found[attempt] = Earlier(text=None if base is None else base + own, own=own,
                                 reasoning_open=reasoning_open, tool_call=tool_call,
                                 final=final)
    return found


def _base(first: Streamed | None, found: dict[int, Earlier], attempt: int) -> str | None:
    """The text an attempt's `started` says it continues ("" for none); None when the
    stream cannot say (no `started` at seq 0, or the text it keeps is not all there)."""
    if first is None or first.event != "started":
        return None
    try:
        resumes = _decode_started(first.data).resumes
    except msgspec.DecodeError:
        return None
    if resumes is None:
        return ""
    prior = found.get(resumes.attempt)
    if (resumes.attempt >= attempt or prior is None or prior.text is None
            or not 0 <= resumes.chars <= len(prior.text)):
        return None
    return prior.text[:resumes.chars]


def plan(attempt: int, entries: Sequence[Streamed] | None, handed: Handed | None, *,
         continues: bool, refused: bool = False) -> Plan:
    """What attempt `attempt` carries on from the earlier ones. `entries`: the job's
    stream read back (None: not readable, a shared stream); `handed`: what a drain
    handed back; `continues`: the alias continues a trailing assistant turn; `refused`:
    its vendor refused one in this process, though it was said to."""
    streamed = attempts(entries or (), attempt)
    if handed is not None and handed.attempt >= attempt:
        handed = None  # written by no earlier attempt: not ours to carry on
    if entries is None and handed is None:
        return Plan(attempt=attempt - 1,
                    restarts=Restarts(attempt=attempt - 1, reason="stream_lost"))
    latest = max(streamed, default=None)
    seen = streamed[latest] if latest is not None else None
    accounted = handed.attempt if handed is not None else 0
    unbilled = [(e.text[:len(e.text) - len(e.own)] if e.text is not None else "", e.own)
                for n, e in streamed.items() if n > accounted and e.own]
    usage = (handed.usage, handed.cost_usd) if handed is not None else (None, 0.0)
    if seen is not None and seen.final is not None and latest is not None:
        return _settles(latest, seen, seen.final)
    midway: Midway | None = None
    if handed is not None and (latest is None or handed.attempt >= latest):
        follows = handed.attempt
        if handed.attempt == latest and seen is not None and seen.text is not None:
            text = handed.text if handed.text.startswith(seen.text) else seen.text
            kept = len(seen.text)
        else:  # the stream no longer shows this attempt: clients are sent all of it
            text, kept = handed.text, 0
        if handed.reason is not None and handed.reason not in ("tool_call", "reasoning"):
            # A reason this version does not know: never continue on a guess.
            return _restart(follows, "stream_lost", usage, unbilled)
        midway = _midway(handed.reason)
        if midway is None and handed.attempt == latest and seen is not None:
            midway = _stream_midway(seen)
    elif latest is not None and seen is not None:
        follows = latest
        if seen.text is None:
            return _restart(follows, "stream_lost", usage, unbilled)
        text, kept = seen.text, len(seen.text)
        midway = _stream_midway(seen)
    else:
        follows, text, kept = attempt - 1, "", 0
    decision = decide(text, continues=continues, midway=midway, refused=refused)
    if decision.reason is not None:
        return _restart(follows, decision.reason, usage, unbilled)
    return Plan(attempt=follows, text=text, unseen=text[kept:],
                resumes=Resumes(attempt=follows, chars=kept), handed_usage=usage[0],
                handed_cost=usage[1], unbilled=unbilled)


def _settles(attempt: int, seen: Earlier, final: Final) -> Plan:
    """The earlier attempt streamed its `final` (its worker stopped before the terminal
    row): the answer is complete, and its `final` counts every attempt before it."""
    shown = seen.text if seen.text is not None and final.text.startswith(seen.text) else ""
    usage = final.usage
    prompt, completion = within(usage.prompt_tokens), within(usage.completion_tokens)
    cached = min(within(usage.cached_tokens), prompt)
    # Counts a row holds, whatever the stream said.
    final = msgspec.structs.replace(final, **{
        name: min(max(getattr(final, name), 0), MAX_COUNT)
        for name in ("retries", "fallbacks", "nul_removed")})
    return Plan(attempt=attempt, text=final.text, unseen=final.text[len(shown):],
                resumes=Resumes(attempt=attempt, chars=len(shown)), complete=final,
                handed_usage=TokenCounts(
                    prompt=prompt, completion=completion, cached=cached,
                    cache_write=min(within(usage.cache_write_tokens), prompt - cached),
                    reasoning=min(within(usage.reasoning_tokens), completion)),
                handed_cost=None if final.cost_usd is None else max(final.cost_usd, 0.0))


def _restart(follows: int, reason: RestartReason,
             usage: tuple[TokenCounts | None, float | None],
             unbilled: list[tuple[str, str]]) -> Plan:
    return Plan(attempt=follows, restarts=Restarts(attempt=follows, reason=reason),
                handed_usage=usage[0], handed_cost=usage[1], unbilled=unbilled)


def _midway(reason: str | None) -> Midway | None:
    match reason:
        case "tool_call" | "reasoning":
            return reason
        case _:
            return None


def _stream_midway(seen: Earlier) -> Midway | None:
    if seen.tool_call:
        return "tool_call"
    if seen.reasoning_open:
        return "reasoning"
    return None


def earlier_usage(plan: Plan, prompt_tokens: int,
                  count: Callable[[str], int]) -> list[TokenCounts]:
    """What each earlier attempt nothing accounted for used, estimated: the prompt
    (`prompt_tokens`, plus the text it continued) and its own text."""
    return [TokenCounts(prompt=prompt_tokens + (count(prefix) if prefix else 0),
                        completion=count(own)) for prefix, own in plan.unbilled]
