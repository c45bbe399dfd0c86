"""What actors send each other. One union per mailbox; commands are imperative,
events past tense, data nouns.

A `receipt` is set by the sink once the record is durably written; the
conversation waits on receipts before it lets the offset commit.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import trio

from messages.wire import DoneStatus, EventBody


class Receipt:
    """A sink's word that a message is durably written. `refused` says why, when the
    server refused the record and only its minimal form was written instead."""

    __slots__ = ("_written", "refused", "superseded")

    def __init__(self) -> None:
        self._written = trio.Event()
        self.refused: str | None = None
        # A later attempt of the job holds it: nothing of this attempt was written.
        # For a rejection: the job id is another job's, and nothing was written.
        self.superseded = False

    def set(self, refused: str | None = None) -> None:
        self.refused = refused
        self._written.set()

    def is_set(self) -> bool:
        return self._written.is_set()

    async def wait(self) -> str | None:
        """Return once written: None, or why only the minimal form was."""
        await self._written.wait()
        return self.refused


class JobRef(msgspec.Struct, frozen=True, kw_only=True):
    """Who an event belongs to and where it goes."""

    job_id: str
    user_id: str
    session_id: str
    attempt: int
    stream_key: str


# --- redis_sink mailbox -------------------------------------------------------------

class EventEmitted(msgspec.Struct, frozen=True, kw_only=True):
    job: JobRef
    body: EventBody
    receipt: Receipt | None = None
    # Continue an attempt's sequence from here (a `done` re-sent after a crash).
    first_seq: int | None = None


RedisSinkMessage = EventEmitted


# --- pg_sink mailbox ----------------------------------------------------------------

class CallMade(msgspec.Struct, frozen=True):
    """A tool call the model made, as the history keeps it."""

    id: str
    name: str
    arguments: str  # the vendor's JSON text, byte for byte


class ImageRef(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """An image of a user turn as the history keeps it: by content hash (the bytes are
    stored once per user, apart from the turn) or by its https URL."""

    tokens: int  # the prompt estimate
    sha256: str = ""
    media_type: str = ""
    url: str = ""


class StoredImage(msgspec.Struct, frozen=True):
    """A new turn's image: its reference, and the bytes of a data URL to store once."""

    ref: ImageRef
    data: bytes = b""


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    images: list[ImageRef] | None = None  # a user turn's attachments
    tool_calls: list[CallMade] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a `tool` turn: the call it answers
    # Signed reasoning before the calls ({type, thinking, signature} and
    # {type: redacted_thinking, data}, in the vendor's order), sent back with them.
    thinking_blocks: list[dict[str, str]] | None = None


class JobFinished(msgspec.Struct, frozen=True, kw_only=True):
    """A job reached its terminal status: its row, and the exchange for the history."""

    job_id: str
    user_id: str
    session_id: str
    status: DoneStatus
    attempt: int  # fences the write: it lands only while no later attempt claimed the job
    model: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    ttft_ms: int | None
    latency_ms: int
    error: str | None
    partial: bool
    user_message: str
    user_tokens: int
    answer: str  # may be "" (nothing streamed): then no assistant row is written
    messages: bool = True  # write the exchange to llm_messages (not for a minimal record)
    retrieval_ms: int | None = None
    retrieval_hits: int | None = None
    retries: int = 0
    fallbacks: int = 0
    reserved: bool = False  # holds a budget reservation to settle
    tool_results: list[tuple[str, str]] = []  # v2: (tool call id, content) this job answered
    tool_calls: list[CallMade] = []  # v2: the calls the answer made
    thinking_blocks: list[dict[str, str]] = []  # v2: the signed reasoning before those calls
    images: list[StoredImage] = []  # v2: the user message's attachments
    # v2: the parts of the usage priced at their own rates (contract 3)
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    receipt: Receipt | None = None


class JobRejected(msgspec.Struct, frozen=True, kw_only=True):
    """A job that never ran, with a row so the gateway can see why: bad input that
    named it (`rejected`), or a claim that failed on an error nobody expected
    (`failed`)."""

    job_id: str
    user_id: str
    session_id: str
    error: str
    status: Literal["rejected", "failed"] = "rejected"
    receipt: Receipt | None = None


PgSinkMessage = JobFinished | JobRejected


# --- provider stream (request/reply inside a conversation) ------------------------

class TokenDelta(msgspec.Struct, frozen=True, kw_only=True):
    text: str


class ReasoningDelta(msgspec.Struct, frozen=True, kw_only=True):
    """The model's reasoning (thinking) text: streamed apart, never part of the answer."""

    text: str


class ThinkingPiece(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of the vendor's reasoning block number `index` (Anthropic's content
    blocks): `thinking` text and its `signature`, or a `redacted_thinking` block's
    opaque `data`. A block goes back to the vendor whole, signed, with the results of
    tools called after it; never in part."""

    index: int
    kind: Literal["thinking", "redacted_thinking"]
    thinking: str = ""
    signature: str = ""
    data: str = ""


class ToolCallDelta(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of the model's call of tool number `index`: the vendor splits a call over
    many chunks, `id` and `name` usually only in the first, `arguments` anywhere."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class StreamFinished(msgspec.Struct, frozen=True, kw_only=True):
    """The end of one try. The counts follow contract 3's one rule whatever the vendor:
    `prompt_tokens` counts every prompt token (cached ones are parts of it),
    `completion_tokens` every generated one (reasoning ones are part of it)."""

    finish_reason: str
    prompt_tokens: int | None  # None: the vendor did not report usage
    completion_tokens: int | None
    model: str  # what the vendor says answered
    cached_tokens: int = 0  # prompt tokens read from the vendor's cache
    cache_write_tokens: int = 0  # prompt tokens written to it
    reasoning_tokens: int = 0  # completion tokens spent reasoning


ProviderChunk = TokenDelta | ReasoningDelta | ThinkingPiece | ToolCallDelta | StreamFinished


# --- intake: one record as it came off Kafka -----------------------------------------

Partition = tuple[str, int]  # (topic, partition number)


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
