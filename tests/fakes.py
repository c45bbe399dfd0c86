"""One small fake per port of our own (actors/ports.py), for unit tests of actor logic.

Only our ports are faked here; Kafka, Redis, Postgres and the vendor are real in
the integration tests. The block at the end holds each fake to its port: the type
checker fails there when a port changes and its fake does not.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import trio

from actors.errors import TransientError
from messages.mailboxes import (
    Delivery,
    Partition,
    ProviderChunk,
    StreamFinished,
    TokenDelta,
    ToolCallDelta,
)
from messages.ports import (
    Capabilities,
    Claimed,
    ClaimOrder,
    ClaimResult,
    Handed,
    Hit,
    Hold,
    Rates,
    Refused,
    Streamed,
    StreamEntry,
    TokenCounts,
)

if TYPE_CHECKING:
    from actors.ports import (
        ChatModel,
        DocumentIndex,
        Embedder,
        EventWriter,
        JobStore,
        Pricing,
        RequestSource,
        TokenCounting,
    )


@dataclass
class FakeStore:
    """The JobStore port: every claim is a fresh attempt 1 (`claim_many` makes each
    order's `claim`, in order), every lease renews unless taken over (`taken`) or
    Postgres is `down`."""

    released: list[str] = field(default_factory=list[str])
    renewals: list[tuple[list[str], float]] = field(default_factory=list[tuple[list[str], float]])
    taken: set[str] = field(default_factory=set[str])
    down: bool = False

    async def claim(self, **_: object) -> ClaimResult:
        return Claimed(1)

    async def claim_many(self, orders: Sequence[ClaimOrder], *, lease_holder: str,
                         lease_s: float, history_limit: int = 0) -> list[ClaimResult]:
        return [await self.claim(**msgspec.structs.asdict(order), lease_holder=lease_holder,
                                 lease_s=lease_s, history_limit=history_limit)
                for order in orders]

    async def renew_leases(self, *, job_ids: Sequence[str], lease_holder: str,
                           lease_s: float) -> set[str]:
        self.renewals.append((list(job_ids), trio.current_time()))
        if self.down:
            raise TransientError("postgres is down")
        return set(job_ids) - self.taken

    async def next_attempt(self, *, job_id: str, lease_holder: str, attempt: int) -> bool:
        return job_id not in self.taken

    async def release_lease(self, *, job_id: str, lease_holder: str,
                            handed: Handed | None = None) -> None:
        self.released.append(job_id)

    async def reserve(self, *, job_id: str, lease_holder: str, holds: Sequence[Hold],
                      period: str) -> Refused | None:
        return None

    async def prune_ledger(self, *, period: str) -> int:
        return 0

    async def images(self, *, user_id: str, hashes: Iterable[str]) -> dict[str, tuple[str, bytes]]:
        return {}


class NoEvents:
    """The EventWriter port for jobs that never ran before: no stream holds anything of
    them, no attempt is fenced, and what is written lands and is forgotten."""

    async def write(self, entries: Sequence[StreamEntry]) -> set[tuple[str, int]]:
        return set()  # no later attempt holds a job: nothing is turned away

    async def done_recorded(self, job_id: str) -> bool:
        return False

    async def last_seq(self, job_id: str, attempt: int) -> int:
        return -1

    async def hand_over(self, job_id: str, attempt: int) -> None:
        pass

    async def take_over(self, job_id: str, attempt: int) -> list[Streamed] | None:
        return []

    async def fenced(self, job_id: str, attempt: int) -> bool:
        return False


@dataclass
class FlatPricing:
    """The Pricing port at fixed per-token prices (0 by default: free)."""

    input_price: float = 0.0
    output_price: float = 0.0

    def cost_usd(self, model: str, used: TokenCounts, own: Rates) -> float | None:
        input_price = self.input_price if own.input is None else own.input
        output_price = self.output_price if own.output is None else own.output
        return used.prompt * input_price + used.completion * output_price

    def provider_of(self, model: str) -> str:
        return model.split("/", 1)[0] if "/" in model else "unknown"

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities()


class WordCounting:
    """The TokenCounting port: one token per word."""

    def counter(self, model: str) -> Callable[[str], int]:
        return lambda text: len(text.split())


class FakeEmbedder:
    """The Embedder port: one axis per known word, so a query is nearest the texts that
    share its words. Records each batch; `gate`, when given, holds the first batch until
    it is set (`entered` tells the batch has begun)."""

    WORDS = ("tansu", "redis", "postgres", "kafka", "chroma", "stream", "fsync", "broker")

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[str]] = []
        self.gate = gate
        self.entered = threading.Event()

    def embed(self, texts: list[str]) -> np.ndarray[Any, Any]:
        self.batches.append(list(texts))
        self.entered.set()
        if self.gate is not None and len(self.batches) == 1:
            self.gate.wait(timeout=30)
        rows = np.array([[float(w in t.lower()) for w in self.WORDS] + [0.01] for t in texts],
                        dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@dataclass
class FakeDocuments:
    """The DocumentIndex port over texts in memory: `collections` maps a name to its
    chunk texts (chunk id = vector id = f"{name}/{n}"); `broken` names fail with a
    TransientError; every Chroma-like query is recorded."""

    collections: dict[str, list[str]]
    broken: set[str] = field(default_factory=set[str])
    vector_queries: list[tuple[str, int]] = field(default_factory=list[tuple[str, int]])
    embedder: FakeEmbedder = field(default_factory=FakeEmbedder)

    def _hit(self, name: str, n: int, score: float) -> Hit:
        text = self.collections[name][n]
        return Hit(id=f"{name}/{n}", text=text, source=f"{name}/{n}", score=score,
                   metadata={"vector_id": f"{name}/{n}"}, collection=name)

    def exists(self, collection: str, /) -> bool:
        return collection in self.collections

    def vector_search_many(self, collection: str, vectors: list[np.ndarray[Any, Any]], k: int,
                           where: dict[str, Any] | None, /) -> list[list[Hit]]:
        self.vector_queries.append((collection, len(vectors)))
        if collection in self.broken:
            raise TransientError(f"{collection} is away")
        stored = self.embeddings(collection, [f"{collection}/{n}" for n in
                                              range(len(self.collections[collection]))])
        out: list[list[Hit]] = []
        for vector in vectors:
            scores = sorted(((float(v @ vector), int(i.rsplit("/", 1)[1]))
                             for i, v in stored.items()), reverse=True)
            out.append([self._hit(collection, n, s) for s, n in scores[:k]])
        return out

    def keyword_search(self, collection: str, query: str, k: int,
                       where: dict[str, Any] | None, /) -> list[Hit]:
        words = set(query.lower().split())
        found = [(len(words & set(t.lower().split())), n)
                 for n, t in enumerate(self.collections[collection])]
        return [self._hit(collection, n, s) for s, n in sorted(found, reverse=True) if s][:k]

    def embeddings(self, collection: str, vector_ids: list[str], /
                   ) -> dict[str, np.ndarray[Any, Any]]:
        texts = {i: self.collections[collection][int(i.rsplit("/", 1)[1])] for i in vector_ids}
        vectors = FakeEmbedder().embed(list(texts.values()))
        return dict(zip(texts, vectors, strict=True))


@dataclass(frozen=True)
class Reply:
    """One scripted model call. It plays in this order: the resend question, the
    tokens, the tool calls, silence (`hang`), a token too late (`late_s`), and last
    the `error` or else the finish."""

    # Each token is its text, sent at once, or (seconds after the call, text).
    tokens: Sequence[str | tuple[float, str]] = ()
    tool_calls: Sequence[str] = ()  # each call's arguments, in one delta (name "f", id "c<n>")
    hang: bool = False  # silent until hung up on
    # A read that cannot be cancelled (one in a thread) lasting late_s, whose token
    # "late" is then put in the mailbox without waiting: a hang-up reaches it only after.
    late_s: float | None = None
    error: Exception | None = None  # raised in place of the finish
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens the finish reports
    # First, the call asks to send its request again for this reason (a kept-alive
    # connection lost before any answer); not allowed, it fails as that lost connection.
    resend: str | None = None


@dataclass(frozen=True)
class Call:
    model: str
    messages: list[dict[str, str]]
    at: float  # Trio's clock when it was made


@dataclass
class ScriptedChat:
    """The ChatModel port answering its calls with `replies`, one each, in order.
    Records each call, each chunk it put in the mailbox, each answer to its resend
    question, and whether a call was cancelled."""

    replies: Sequence[Reply]
    calls: list[Call] = field(default_factory=list[Call])
    sent: list[ProviderChunk] = field(default_factory=list[ProviderChunk])
    resends: list[bool] = field(default_factory=list[bool])
    cancelled: bool = False

    async def stream(self, *, model: str, api_base: str | None, api_key_env: str | None,
                     messages: list[dict[str, str]], params: Mapping[str, Any],
                     out: trio.MemorySendChannel[ProviderChunk],
                     stream_path: str = "auto",
                     resend: Callable[[str], Awaitable[bool]] | None = None) -> None:
        self.calls.append(Call(model, messages, trio.current_time()))
        with out:
            if len(self.calls) > len(self.replies):
                raise AssertionError(f"call {len(self.calls)} of a model scripted for "
                                     f"{len(self.replies)}")
            try:
                await self._play(self.replies[len(self.calls) - 1], model, out, resend)
            except trio.Cancelled:
                self.cancelled = True
                raise

    async def _play(self, reply: Reply, model: str, out: trio.MemorySendChannel[ProviderChunk],
                    resend: Callable[[str], Awaitable[bool]] | None) -> None:
        start = trio.current_time()
        if reply.resend is not None:
            # As the HTTP/1.1 client: with no `resend` to ask, it does not send again.
            allowed = resend is not None and await resend(reply.resend)
            self.resends.append(allowed)
            if not allowed:
                raise TransientError("connection lost")
        for token in reply.tokens:
            if isinstance(token, tuple):
                at, token = token
                await trio.sleep_until(start + at)
            await self._send(out, TokenDelta(text=token))
        for index, arguments in enumerate(reply.tool_calls):
            await self._send(out, ToolCallDelta(index=index, id=f"c{index}", name="f",
                                                arguments=arguments))
        if reply.hang:
            await trio.sleep_forever()
        if reply.late_s is not None:
            with trio.CancelScope(shield=True):
                await trio.sleep(reply.late_s)
            late = TokenDelta(text="late")
            out.send_nowait(late)
            self.sent.append(late)
        if reply.error is not None:
            raise reply.error
        prompt, completion = reply.usage or (None, None)
        await self._send(out, StreamFinished(finish_reason="stop", prompt_tokens=prompt,
                                             completion_tokens=completion, model=model))

    async def _send(self, out: trio.MemorySendChannel[ProviderChunk],
                    chunk: ProviderChunk) -> None:
        await out.send(chunk)
        self.sent.append(chunk)


class ScriptedRequests:
    """The RequestSource port over values scripted in advance, at offsets 0, 1, ... of
    partition 0 of topic "t". A value is there from the start, or given as (the time on
    Trio's clock it arrives, value). A poll waits its whole timeout (so a test can count
    polls in time), then hands over, in order, up to `max_records` of the values
    arrived; nothing while paused. `seek`
    puts deliveries back to be handed over first. Each commit is recorded, or raises
    the next of `commit_errors`."""

    def __init__(self, values: Iterable[bytes | tuple[float, bytes]], *,
                 commit_errors: Iterable[Exception] = ()) -> None:
        self.waiting: list[tuple[float, Delivery]] = []
        for offset, value in enumerate(values):
            at, value = value if isinstance(value, tuple) else (-math.inf, value)
            self.waiting.append((at, Delivery(topic="t", partition=0, offset=offset,
                                              key=None, value=value)))
        self.commit_errors = list(commit_errors)
        self.commits: list[dict[Partition, int]] = []
        self.paused = False
        self.closed = False

    async def poll(self, max_records: int, timeout_s: float) -> list[Delivery]:
        await trio.sleep(timeout_s)
        batch: list[Delivery] = []
        while (not self.paused and self.waiting and len(batch) < max_records
               and self.waiting[0][0] <= trio.current_time()):
            batch.append(self.waiting.pop(0)[1])
        return batch

    async def commit(self, offsets: Mapping[Partition, int], *, wait: bool = True) -> None:
        if self.commit_errors:
            raise self.commit_errors.pop(0)
        self.commits.append(dict(offsets))

    async def pause(self) -> None:
        self.paused = True

    async def resume(self) -> None:
        self.paused = False

    async def seek(self, deliveries: Iterable[Delivery]) -> None:
        self.waiting[:0] = [(-math.inf, delivery) for delivery in deliveries]

    async def close(self) -> None:
        self.closed = True


if TYPE_CHECKING:  # basedpyright fails here when a fake no longer fits its port
    _store: JobStore = FakeStore()
    _events: EventWriter = NoEvents()
    _pricing: Pricing = FlatPricing()
    _tokens: TokenCounting = WordCounting()
    _embedder: Embedder = FakeEmbedder()
    _documents: DocumentIndex = FakeDocuments(collections={})
    _chat: ChatModel = ScriptedChat([])
    _requests: RequestSource = ScriptedRequests([])
