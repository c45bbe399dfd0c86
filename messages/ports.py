"""The values that cross a port (actors/ports.py): what an actor hands an adapter and
what it gets back. Plain data, no I/O, so the domain never imports an adapter to
name them and a fake of a port needs nothing but this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from messages.mailboxes import Turn
from messages.wire import DoneStatus, StreamEvent

# --- the job store: claiming a job ---------------------------------------------------


class Claimed(msgspec.Struct, frozen=True):
    """This worker now holds the job's lease and runs it as `attempt`."""

    attempt: int
    history: list[Turn] = msgspec.field(default_factory=list[Turn])  # read in the same round trip
    over_rejected: bool = False  # the id was a rejected request's: its events are cleared
    handed: Handed | None = None  # what an earlier attempt handed back, if one did


class AlreadyTerminal(msgspec.Struct, frozen=True):
    """The job ended before (a redelivery): never run it again."""

    status: DoneStatus
    attempt: int = 1
    partial: bool = False
    ran: bool = True  # False: no worker ever ran it (a request the gateway refused and fenced)


class LeasedElsewhere(msgspec.Struct, frozen=True):
    """Another worker holds a live lease on the job."""

    lease_holder: str


class OwnedByAnotherUser(msgspec.Struct, frozen=True):
    """The job id belongs to another user's job: this request is ignored."""


ClaimResult = Claimed | AlreadyTerminal | LeasedElsewhere | OwnedByAnotherUser


class ClaimOrder(msgspec.Struct, frozen=True):
    """One job to claim: what its llm_jobs row starts with."""

    job_id: str
    user_id: str
    session_id: str
    trace_id: str
    mode: str
    model: str
    provider: str
    # contract v3: the API key that sent it, the client's `user` and `metadata`
    api_key_id: str | None = None
    end_user: str | None = None
    metadata: dict[str, str] | None = None

# --- the job store: budgets ----------------------------------------------------------

HoldKind = Literal["usd", "requests", "tokens"]


class Hold(msgspec.Struct, frozen=True):
    """Reserve `amount` of `kind` against `scope`'s `limit`."""

    scope: str
    kind: HoldKind
    amount: float
    limit: float


class Refused(msgspec.Struct, frozen=True):
    """The reservation that did not fit: `taken` is already used + reserved."""

    scope: str
    kind: HoldKind
    amount: float
    limit: float
    taken: float


class UsageRow(msgspec.Struct, frozen=True):
    user_id: str
    model: str
    jobs: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cached_tokens: int = 0  # parts of prompt_tokens (contract 3)
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0  # part of completion_tokens
    api_key_id: str | None = None  # grouped by key: the key's id (None: a JWT's jobs)


# --- the event log -------------------------------------------------------------------


# A Redis stream entry as read back (the gateway): its id ("<ms>-<n>") and its fields.
Entry = tuple[str, dict[str, str]]
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
U64_MAX = 2**64 - 1


def int_field(fields: Mapping[str, str], name: str) -> int | None:
    """An entry's integer field (`attempt`, `seq`); None when missing or not an integer
    (a hand-written or damaged entry is still relayed, never a crash of the reader)."""
    value = fields.get(name, "")
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None


def is_entry_id(text: str) -> bool:
    """A Redis stream entry id: two u64 values (each 0..2^64-1) joined by `-`. Twenty
    digits alone are not enough: Redis refuses an XREAD naming a part above 2^64-1
    (the whole multi-stream read fails), so such an id is refused before any read."""
    if not _ENTRY_ID.fullmatch(text):  # fullmatch: `$` would let a trailing "\n" in
        return False
    ms, _, seq = text.partition("-")
    # Nineteen digits are always below 2^64: only twenty are compared.
    return (len(ms) < 20 or int(ms) <= U64_MAX) and (len(seq) < 20 or int(seq) <= U64_MAX)


class StreamEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One event and the Redis stream it goes to."""

    key: str
    event: StreamEvent


class Streamed(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a job's stream as it was read back: unchecked, since anything able
    to write to Redis may have written it."""

    event: str
    attempt: int
    seq: int
    data: str


# --- the document store --------------------------------------------------------------


class Hit(msgspec.Struct, frozen=True, kw_only=True):
    """One chunk found by a search, with its score in that search."""

    id: str
    text: str
    source: str
    score: float
    metadata: dict[str, Any]
    collection: str = ""


class TokenCounts(msgspec.Struct, frozen=True, kw_only=True):
    """One try's usage under contract 3's rule: `cached` and `cache_write` are parts of
    `prompt`, `reasoning` part of `completion`."""

    prompt: int
    completion: int
    cached: int = 0
    cache_write: int = 0
    reasoning: int = 0


class Handed(msgspec.Struct, frozen=True, kw_only=True):
    """What an attempt stopped before its end left for the next one (llm_jobs.handed):
    its answer so far, why it may not be continued (None: it may), and what it used."""

    attempt: int
    text: str
    reason: str | None = None  # a RestartReason
    usage: TokenCounts = msgspec.field(default_factory=lambda: TokenCounts(prompt=0, completion=0))
    cost_usd: float | None = 0.0


class Rates(msgspec.Struct, frozen=True, kw_only=True):
    """An alias's own prices in USD per token; None: LiteLLM's price map says."""

    input: float | None = None
    output: float | None = None
    cache_read: float | None = None
    cache_write: float | None = None


class Capabilities(msgspec.Struct, frozen=True):
    """What a model alias takes besides text (contract 2.1, version 2)."""

    vision: bool = False
    tools: bool = False
    reasoning: bool = False
    # Continues a trailing assistant turn (prefill); None: the map does not know the model.
    continues: bool | None = None
