"""provider: one answer from the model, through retries and fallbacks.

Runs inside the conversation's nursery (request/reply work that dies with the
job). Each try streams through the ChatModel port under its own stall watch
(first token, then idle gap). A transient failure (429 with its Retry-After,
5xx, a dropped connection, a stall) is retried with capped, jittered backoff;
then the alias's `fallbacks` are tried in order. A permanent failure (bad
request, auth, context length) ends it at once.

When a try breaks after the client was sent something, the one decision of
actors/job/continuing.py says how the next goes on: it continues the same answer (the
text so far goes to the model as the start of the assistant turn, and only the
new text is streamed on), or the answer starts over as a new attempt of the job
(`started.restarts`, contract 3.3), never a prefill the alias cannot take. A vendor
that refuses a prefill all the same is answered with one restart, and its alias
is not continued again in this process.

Before every try the job's fence is read (`Listeners.before_try`): a job that a
later attempt holds, or that has ended, is never sent to the model again.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple, assert_never

import trio

from actors.aliases import Alias
from actors.backoff import Backoff
from actors.channels import ready
from actors.errors import (
    PermanentError,
    PrefillRefused,
    ProviderExhausted,
    Stalled,
    TransientError,
)
from actors.job.continuing import Midway, decide
from actors.job.spend import Spend, within, worst_try_usd
from actors.metrics import Metrics
from actors.ports import ChatModel, Pricing
from actors.telemetry import error_type
from config import Config, Jobs, Limits, ModelAlias
from messages.mailboxes import (
    ProviderChunk,
    ReasoningDelta,
    StreamFinished,
    ThinkingPiece,
    TokenDelta,
    ToolCallDelta,
)
from messages.ports import TokenCounts
from messages.wire import RestartReason, ToolCall

log = logging.getLogger("chat_actors.provider")

PROVIDER_MAILBOX = 64


class TimedTry(NamedTuple):
    alias: str
    model: str
    started: float
    ended: float
    error_type: str | None


@dataclass(frozen=True)
class Answer:
    """What the model produced for one attempt: its text, tries, usage and tool calls."""

    text: str = ""
    carried: str = ""  # the start of `text` an earlier attempt streamed (takeover.py)
    carried_tokens: int = 0  # its tokens, counted once
    finished: StreamFinished | None = None
    alias: str = ""  # the alias of its last try
    spent: Spend = field(default_factory=Spend)  # every try's usage and cost
    first_token_at: float | None = None
    tries: int = 0
    retries: int = 0  # tries again on the same alias
    fallbacks: int = 0  # switches to the next alias
    nul_removed: int = 0  # U+0000 characters the vendor sent (Postgres cannot store them)
    tool_calls: tuple[ToolCall, ...] = ()  # of the finished try
    # Each try's alias, model, Trio start and end, and error type (None: it finished).
    timed: tuple[TimedTry, ...] = ()
    # The finished try's reasoning, when the vendor signed it: {type, thinking, signature}.
    thinking_blocks: tuple[dict[str, str], ...] = ()
    # What the try was in the middle of when the answer stopped: "tool_call" (a call
    # had begun), "reasoning" (thinking since its last answer text), or None.
    midway: Midway | None = None

    @property
    def new_text(self) -> str:
        """The text this attempt's tries produced (not the earlier attempt's)."""
        return self.text[len(self.carried):]


class Draft:
    """The answer as it streams, written by this module alone; `answer()` is its value
    at any moment, so a cancel or a timeout mid-stream still leaves the partial text."""

    def __init__(self, *, alias: str = "", carried: str = "", carried_tokens: int = 0) -> None:
        self.parts = [carried] if carried else []
        self.kept = len(self.parts)  # leading parts an earlier attempt streamed
        self.carried_tokens = carried_tokens if carried else 0
        self.alias = alias
        self.finished: StreamFinished | None = None
        self.spent = Spend()
        self.first_token_at: float | None = None
        self.tries = self.retries = self.fallbacks = self.nul_removed = 0
        self.tool_calls: list[ToolCall] = []
        self.timed: list[TimedTry] = []
        self.thinking_blocks: list[dict[str, str]] = []
        self.midway: Midway | None = None
        self.reasoned = False  # this attempt sent the client reasoning
        # Whitespace the client holds at the end of a continued text, which the prefill
        # leaves out (vendors refuse or strip it): the new text's first characters, when
        # they are that whitespace, are not sent again.
        self.held = ""

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def carried(self) -> str:
        return "".join(self.parts[:self.kept])

    def answer(self) -> Answer:
        return Answer(text=self.text, carried=self.carried,
                      carried_tokens=self.carried_tokens, finished=self.finished,
                      alias=self.alias, spent=self.spent, first_token_at=self.first_token_at,
                      tries=self.tries, retries=self.retries, fallbacks=self.fallbacks,
                      nul_removed=self.nul_removed, tool_calls=tuple(self.tool_calls),
                      timed=tuple(self.timed), thinking_blocks=tuple(self.thinking_blocks),
                      midway=self.midway)

    def past_held(self, text: str) -> str:
        """`text` less the held whitespace it starts with (see `held`)."""
        held = self.held
        same = next((n for n, (a, b) in enumerate(zip(held, text, strict=False)) if a != b),
                    min(len(held), len(text)))
        self.held = held[same:] if same == len(text) else ""
        return text[same:]

    def start_over(self) -> None:
        """The answer starts over as a new attempt: nothing of it is carried on."""
        self.parts.clear()
        self.kept = self.carried_tokens = 0
        self.reasoned = False


def prefill_taken(alias: Alias, refused: set[str]) -> tuple[bool, bool]:
    """Whether the alias is said to continue a trailing assistant turn (config, else
    LiteLLM's map), and whether its vendor has refused one in this process all the same
    (`refused`): actors/continuing.decide's `continues` and `refused`."""
    continues = bool(alias.capabilities.continues)
    return continues, continues and alias.name in refused


# Vendors that continue a trailing assistant turn only when it says `prefix: true`
# (LiteLLM's provider names); Mistral refuses such a turn without it. Others may refuse
# the unknown key: they never get it.
PREFIX_FLAGGED = frozenset({"mistral", "codestral", "deepseek"})


def continuation(messages: list[dict[str, Any]], partial: str, *,
                 flagged: bool = False) -> list[dict[str, Any]]:
    """The request that continues `partial`: it is sent as the assistant turn's start,
    marked `prefix: true` when `flagged` (a vendor of PREFIX_FLAGGED)."""
    if not partial:
        return messages
    turn: dict[str, Any] = {"role": "assistant", "content": partial}
    if flagged:
        turn["prefix"] = True
    return [*messages, turn]


@dataclass(frozen=True)
class Listeners:
    """Where the provider hands what streams: answer text, reasoning text, switches."""

    on_token: Callable[[str], Awaitable[None]]
    on_switch: Callable[[str, str, str], Awaitable[None]]
    on_reasoning: Callable[[str], Awaitable[None]] | None = None
    on_tool_call: Callable[[ToolCall], Awaitable[None]] | None = None
    # The answer starts over as a new attempt (alias to answer it, why): the job's
    # attempt moves on and its `started{restarts}` is sent before this returns.
    on_restart: Callable[[str, RestartReason], Awaitable[None]] | None = None
    # Before every try: stops the job (a cancel) if its fence says it is not ours to run.
    before_try: Callable[[], Awaitable[None]] | None = None


def assemble_tool_calls(pieces: dict[int, list[ToolCallDelta]], provider: str) -> list[ToolCall]:
    """One call per index, in index order: the first id and name given, the arguments
    joined byte for byte (empty pieces included); an id the vendor never sent is made."""
    calls: list[ToolCall] = []
    for index in sorted(pieces):
        parts = pieces[index]
        name = next((p.name for p in parts if p.name), None)
        if name is None:
            raise TransientError(f"{provider}: tool call {index} came without a name",
                                 kind="protocol")
        call_id = next((p.id for p in parts if p.id), None) or f"call_{uuid.uuid4().hex[:24]}"
        calls.append(ToolCall(index=index, id=call_id, name=name,
                              arguments="".join(p.arguments for p in parts)))
    return calls


class _CallPieces:
    """One try's tool-call pieces, as the vendor streams them, within the limits of
    what one answer may hold (limits.max_tool_calls, limits.max_tool_call_chars): a
    vendor that goes past them is cut off, not kept in memory, Redis and Postgres."""

    def __init__(self, limits: Limits, model: str) -> None:
        self.limits = limits
        self.model = model
        self.pieces: dict[int, list[ToolCallDelta]] = {}
        self.chars = 0

    def add(self, piece: ToolCallDelta) -> PermanentError | None:
        """Keep `piece`; or the error that ends the job, when it is one too many."""
        limits = self.limits
        if piece.index not in self.pieces and len(self.pieces) >= limits.max_tool_calls:
            return PermanentError(f"{self.model}: the answer makes more than "
                                  f"limits.max_tool_calls ({limits.max_tool_calls}) tool calls",
                                  code="tool_calls_too_large")
        size = len(piece.arguments) + len(piece.id or "") + len(piece.name or "")
        self.chars += size
        if self.chars > limits.max_tool_call_chars:
            return PermanentError(
                f"{self.model}: the answer's tool calls hold more than "
                f"limits.max_tool_call_chars ({limits.max_tool_call_chars}) characters",
                code="tool_calls_too_large")
        kept = self.pieces.setdefault(piece.index, [])
        if size:  # an empty piece changes nothing: not kept, so a stream of them costs none
            kept.append(piece)
        return None


class _ThinkingBlocks:
    """One try's reasoning blocks as the vendor numbered them, each kept whole: a
    thinking block with its text and signature, a redacted block with its data."""

    def __init__(self) -> None:
        self._kinds: dict[int, str] = {}
        self._texts: dict[int, list[str]] = {}
        self._signed: dict[int, str] = {}

    def add(self, piece: ThinkingPiece) -> None:
        kind = self._kinds.setdefault(piece.index, piece.kind)
        if kind != piece.kind:
            return  # two kinds under one number: the vendor's muddle, not ours to mend
        if kind == "redacted_thinking":
            self._texts.setdefault(piece.index, []).append(piece.data)
        else:
            self._texts.setdefault(piece.index, []).append(piece.thinking)
            if piece.signature:
                self._signed[piece.index] = piece.signature

    def whole(self) -> list[dict[str, str]]:
        """The blocks in the vendor's order, only those it can take back: a thinking
        block without its signature is never sent back in part."""
        found: list[dict[str, str]] = []
        for index in sorted(self._kinds):
            text = "".join(self._texts.get(index, ()))
            if self._kinds[index] == "redacted_thinking":
                found.append({"type": "redacted_thinking", "data": text})
            elif index in self._signed:
                found.append({"type": "thinking", "thinking": text,
                              "signature": self._signed[index]})
        return found


def _runs(chunks: list[TokenDelta | ReasoningDelta]) -> list[tuple[bool, str]]:
    """(is reasoning, text) for each run of one kind, in order."""
    runs: list[tuple[bool, list[str]]] = []
    for chunk in chunks:
        thought = isinstance(chunk, ReasoningDelta)
        if runs and runs[-1][0] == thought:
            runs[-1][1].append(chunk.text)
        else:
            runs.append((thought, [chunk.text]))
    return [(thought, "".join(texts)) for thought, texts in runs]


# A request's `params` name (config `drop_params`) -> the name sent to the vendor.
_PARAM_NAMES = {"temperature": "temperature", "topP": "top_p", "stop": "stop", "seed": "seed",
                "reasoningEffort": "reasoning_effort"}


def params_for(spec: ModelAlias, params: dict[str, Any]) -> dict[str, Any]:
    """The job's parameters as this alias's vendor takes them: those it refuses
    (`drop_params`) left out, so a fallback to another alias still gets them, and its
    `extra_params` added as they are (none of them is a key the worker sets)."""
    dropped = {_PARAM_NAMES[name] for name in spec.drop_params} & params.keys()
    if dropped:
        log.debug("model %s: %s dropped (drop_params)", spec.model, ", ".join(sorted(dropped)))
        params = {name: value for name, value in params.items() if name not in dropped}
    return {**params, **spec.extra_params} if spec.extra_params else params


async def _off_the_clock(stall: trio.CancelScope, sending: Awaitable[None]) -> None:
    """Await `sending` (an event into the job's mailbox) with the vendor's stall clock
    stopped: a full mailbox (Redis slow, a sink behind) is our backpressure, not the
    vendor's silence. Reading pauses meanwhile (the vendor's chunks wait in their own
    bounded mailbox, then in its socket); only the job's own deadline or a cancel can
    end the wait. The clock goes on from where it stood."""
    left = stall.deadline - trio.current_time()
    stall.deadline = math.inf
    try:
        await sending
    finally:
        stall.deadline = trio.current_time() + left


@dataclass
class _Try:
    """One try's stream as it is read: what its stall watch, its outcome and the answer
    learn from the vendor's chunks."""

    spec: ModelAlias
    jobs: Jobs
    draft: Draft
    listeners: Listeners
    calls: _CallPieces
    blocks: _ThinkingBlocks = field(default_factory=_ThinkingBlocks)
    failure: TransientError | PermanentError | None = None
    finished: StreamFinished | None = None
    got_output: bool = False  # answer, reasoning or a tool call: each shows the model is alive
    runaway: PermanentError | None = None  # the vendor's tool calls passed the limits

    async def pump(self, chat: ChatModel, messages: list[dict[str, str]], params: dict[str, Any],
                   out: trio.MemorySendChannel[ProviderChunk],
                   resend: Callable[[str], Awaitable[bool]]) -> None:
        spec = self.spec
        try:
            await chat.stream(model=spec.model, api_base=spec.api_base,
                              api_key_env=spec.api_key_env, messages=messages,
                              params=params_for(spec, params), out=out,
                              stream_path=spec.stream_path, resend=resend)
        except (TransientError, PermanentError) as exc:
            self.failure = exc
        except trio.BrokenResourceError:
            pass  # the reader stopped this try (a stall) and hangs up on it next

    async def read(self, receive: trio.MemoryReceiveChannel[ProviderChunk],
                   stall: trio.CancelScope, vendor: trio.CancelScope) -> None:
        """Every chunk until the stream ends, a stall, or runaway tool calls (`vendor` is
        cancelled: hung up on)."""
        async with receive:
            async for first in receive:
                # Text that queued up while we were busy becomes one event per run.
                deltas, called = self.sort(ready(receive, first, PROVIDER_MAILBOX + 1))
                if self.runaway is not None:
                    vendor.cancel()  # hang up on the runaway vendor
                    break
                if deltas or called:
                    self.got_output = True
                    stall.deadline = trio.current_time() + self.jobs.idle_timeout_s
                for is_reasoning, text in _runs(deltas):
                    await self.deliver(stall, is_reasoning, text)

    def sort(self, chunks: Iterable[ProviderChunk]) -> tuple[list[TokenDelta | ReasoningDelta],
                                                            bool]:
        """The text of a batch of chunks, and whether a tool call came in it; the rest is
        kept: call pieces, signed thinking, the stream's end."""
        deltas: list[TokenDelta | ReasoningDelta] = []
        called = False
        for chunk in chunks:
            match chunk:
                case TokenDelta() | ReasoningDelta():
                    deltas.append(chunk)
                case ToolCallDelta():
                    self.draft.midway = "tool_call"
                    self.runaway = self.runaway or self.calls.add(chunk)
                    called = True
                case ThinkingPiece():
                    self.blocks.add(chunk)
                case StreamFinished():
                    self.finished = chunk
                case _:
                    assert_never(chunk)
        return deltas, called

    async def deliver(self, stall: trio.CancelScope, is_reasoning: bool, text: str) -> None:
        """One run of answer or reasoning text to the client, and into the answer."""
        draft, listeners = self.draft, self.listeners
        if "\x00" in text:  # dropped here, so tokens, final and row agree
            draft.nul_removed += text.count("\x00")
            text = text.replace("\x00", "")
            if not text:
                return
        if draft.midway != "tool_call":
            draft.midway = "reasoning" if is_reasoning else None
        if is_reasoning:
            draft.reasoned = True
            if listeners.on_reasoning is not None:
                await _off_the_clock(stall, listeners.on_reasoning(text))
            return
        if draft.held:
            text = draft.past_held(text)
            if not text:
                return
        if draft.first_token_at is None:
            draft.first_token_at = trio.current_time()
        # Kept only once sent: the job's deadline or a cancel that cuts the send short
        # (the sink's mailbox full) must not leave the answer holding text the client
        # never got (a takeover continues from it).
        await _off_the_clock(stall, listeners.on_token(text))
        draft.parts.append(text)

    def stalled(self) -> Stalled:
        jobs = self.jobs
        return (Stalled("idle_timeout", jobs.idle_timeout_s) if self.got_output
                else Stalled("first_token_timeout", jobs.first_token_timeout_s))

    async def ended(self) -> StreamFinished:
        """The try's end: its failure raised, or its tool calls and thinking kept."""
        if self.runaway is not None:
            raise self.runaway
        if self.failure is not None:
            raise self.failure
        if self.finished is None:
            raise TransientError("the model stream ended without finishing", kind="protocol")
        draft = self.draft
        draft.midway = None
        draft.tool_calls = assemble_tool_calls(self.calls.pieces, self.spec.model)
        draft.thinking_blocks = self.blocks.whole()
        if self.listeners.on_tool_call is not None:
            for call in draft.tool_calls:
                await self.listeners.on_tool_call(call)
        return self.finished


async def _one_try(chat: ChatModel, spec: ModelAlias, messages: list[dict[str, str]],
                   params: dict[str, Any], config: Config, draft: Draft,
                   listeners: Listeners,
                   resend: Callable[[str], Awaitable[bool]]) -> StreamFinished:
    send, receive = trio.open_memory_channel[ProviderChunk](PROVIDER_MAILBOX)
    jobs = config.jobs
    one = _Try(spec=spec, jobs=jobs, draft=draft, listeners=listeners,
               calls=_CallPieces(config.limits, spec.model))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one.pump, chat, messages, params, send, resend)
        with trio.CancelScope(deadline=trio.current_time() + jobs.first_token_timeout_s) as stall:
            await one.read(receive, stall, nursery.cancel_scope)
        if stall.cancelled_caught:
            nursery.cancel_scope.cancel()  # hang up on the stalled vendor
            one.failure = one.stalled()
    return await one.ended()


@dataclass
class _Chain:
    """One job's walk through its alias, retries and fallbacks (stream_answer's state)."""

    chat: ChatModel
    pricing: Pricing
    config: Config
    messages: list[dict[str, str]]
    params: dict[str, Any]
    count: Callable[[str], int]
    prompt_estimate: int
    draft: Draft
    spend_cap: float | None  # USD the job reserved: no retry may take it past that
    listeners: Listeners
    backoff: Backoff
    metrics: Metrics | None
    refused: set[str]  # aliases whose vendor refused a prefill in this process

    def sent(self) -> dict[str, Any]:
        """The parameters each try sends: while the answer continues an earlier
        attempt's text, it has only the rest of its token budget left."""
        return sent_params(self.params, self.draft.carried_tokens)

    def covered(self, alias: Alias) -> bool:
        """May another try run within the job's budget reservation?"""
        draft, spec, cap = self.draft, alias.spec, self.spend_cap
        if not draft.tries or cap is None or draft.spent.cost_usd is None:
            return True
        # The answer may run to what the request asks (the first alias's limit)
        # even on a fallback whose own limit is lower: take the larger.
        answer_tokens = max(spec.max_tokens, self.sent().get("max_tokens", 0))
        worst = worst_try_usd(self.pricing, spec,
                              self.prompt_estimate + self.count(draft.text), answer_tokens)
        return draft.spent.cost_usd + worst <= cap * (1 + 1e-9)

    async def attempt(self, alias: Alias) -> StreamFinished:
        """One try on `alias`, billed whether it finishes or fails."""
        draft, name, spec = self.draft, alias.name, alias.spec
        text = await self.goes_on(alias)
        if self.listeners.before_try is not None:
            await self.listeners.before_try()
        draft.tries += 1
        draft.alias = name
        before = len(draft.parts)
        prefill = text.rstrip()
        draft.held = text[len(prefill):]
        request = continuation(self.messages, prefill, flagged=bool(prefill) and (
            alias.provider in PREFIX_FLAGGED))
        started, failed = trio.current_time(), "cancelled"  # unless it ends otherwise
        try:
            finished = await _one_try(self.chat, spec, request, self.sent(), self.config,
                                      draft, self.listeners, partial(self.resend, alias))
            failed = None
        except (PermanentError, TransientError) as exc:
            failed = error_type(exc)
            if len(draft.parts) > before:  # a refused request costs nothing
                draft.spent = draft.spent.billed(self.pricing, spec, TokenCounts(
                    prompt=self.prompt_estimate,
                    completion=self.count("".join(draft.parts[before:]))))
            if isinstance(exc, PrefillRefused):
                self.refuse(alias)
                raise
            if self.metrics is not None:
                self.metrics.provider_failed(alias.provider, exc)
            raise
        finally:
            draft.timed.append(TimedTry(name, spec.model, started, trio.current_time(), failed))
        draft.spent = draft.spent.billed(self.pricing, spec,
                                           self.used(finished, "".join(draft.parts[before:])))
        return finished

    async def goes_on(self, alias: Alias) -> str:
        """The text the next try on `alias` continues ("" for none), by the one decision
        (actors/job/continuing.py). Nothing shown to the client yet: a plain retry. A
        restart makes the job's next attempt, which starts from nothing."""
        draft = self.draft
        midway, draft.midway = draft.midway, None
        if not (draft.text or draft.reasoned):
            return ""
        name = alias.name
        continues, refused = prefill_taken(alias, self.refused)
        decision = decide(draft.text, continues=continues, midway=midway, refused=refused)
        if decision.reason is None:
            return draft.text
        if self.listeners.on_restart is None:
            raise PermanentError(f"{name}: the answer cannot go on ({decision.reason}) and "
                                 "this job cannot start over", code="internal")
        log.info("%s: the answer starts over as a new attempt (%s)", name, decision.reason)
        await self.listeners.on_restart(name, decision.reason)
        draft.start_over()
        return ""

    def refuse(self, alias: Alias) -> None:
        """The vendor refused the alias's prefill: no job of it continues again here."""
        name = alias.name
        if name in self.refused:
            return
        self.refused.add(name)
        log.warning("%s: the vendor refuses an assistant prefill (llm.models.%s.continues "
                    "should be false); its answers start over instead of continuing, in "
                    "this process from now on", name, name)
        if self.metrics is not None:
            self.metrics.prefill_refused.labels(alias=name, vendor=alias.provider).inc()

    def used(self, finished: StreamFinished, new_text: str) -> TokenCounts:
        """What the finished try used: the vendor's counts, or our estimate of those it
        did not report. Its parts are kept within their wholes, whatever it sent."""
        prompt = within(finished.prompt_tokens or (
            self.prompt_estimate + self.count(self.draft.text) - self.count(new_text)))
        completion = within(finished.completion_tokens if finished.completion_tokens is not None
                             else self.count(new_text))
        cached = min(max(finished.cached_tokens, 0), prompt)
        return TokenCounts(prompt=prompt, completion=completion, cached=cached,
                           cache_write=min(max(finished.cache_write_tokens, 0), prompt - cached),
                           reasoning=min(max(finished.reasoning_tokens, 0), completion))

    async def resend(self, alias: Alias, why: str) -> bool:
        """The transport asks to send the request again (it may have reached the vendor):
        it counts as a retry, and only if the budget reservation still covers a try."""
        if not self.covered(alias):
            return False
        log.warning("%s: %s", alias.name, why)
        self.count_retry(alias)
        await self.listeners.on_switch(alias.name, alias.name, why)
        return True

    def count_retry(self, alias: Alias) -> None:
        self.draft.retries += 1
        if self.metrics is not None:
            self.metrics.provider_retries.labels(vendor=alias.provider).inc()

    async def retry(self, alias: Alias, retry: int, exc: TransientError) -> None:
        wait = self.backoff.delay(retry, exc.retry_after)
        log.warning("%s failed (%s); retry %d in %.2fs", alias.name, exc, retry, wait)
        self.count_retry(alias)
        await self.listeners.on_switch(alias.name, alias.name, str(exc))
        await trio.sleep(wait)

    async def fall_back(self, alias: Alias, to: Alias, exc: TransientError) -> None:
        log.warning("%s failed (%s); falling back to %s", alias.name, exc, to.name)
        self.draft.fallbacks += 1
        if self.metrics is not None:
            self.metrics.provider_fallbacks.labels(
                from_vendor=alias.provider, to_vendor=to.provider).inc()
        await self.listeners.on_switch(alias.name, to.name, str(exc))


def sent_params(params: dict[str, Any], carried_tokens: int) -> dict[str, Any]:
    """`params` for an answer whose first `carried_tokens` the prompt already holds."""
    if not carried_tokens or "max_tokens" not in params:
        return params
    return params | {"max_tokens": max(1, params["max_tokens"] - carried_tokens)}


async def stream_answer(*, chat: ChatModel, pricing: Pricing, config: Config,
                        chain: Sequence[Alias],
                        messages: list[dict[str, str]], params: dict[str, Any],
                        count: Callable[[str], int], prompt_estimate: int,
                        on_token: Callable[[str], Awaitable[None]],
                        on_switch: Callable[[str, str, str], Awaitable[None]],
                        draft: Draft | None = None, spend_cap: float | None = None,
                        backoff: Backoff | None = None, metrics: Metrics | None = None,
                        on_reasoning: Callable[[str], Awaitable[None]] | None = None,
                        on_tool_call: Callable[[ToolCall], Awaitable[None]] | None = None,
                        on_restart: Callable[[str, RestartReason], Awaitable[None]] | None = None,
                        before_try: Callable[[], Awaitable[None]] | None = None,
                        refused: set[str] | None = None) -> Answer:
    """The answer of the alias, its retries and fallbacks; raise PermanentError or
    ProviderExhausted. `draft` (its carried text continued) keeps the partial answer
    when this raises or is cancelled. `spend_cap`: the USD the job reserved. `refused`:
    the aliases whose vendor refused a prefill in this process (added to here)."""
    llm = config.llm
    draft = Draft(alias=chain[0].name) if draft is None else draft
    walk = _Chain(chat=chat, pricing=pricing, config=config, messages=messages, params=params,
                  count=count, prompt_estimate=prompt_estimate, draft=draft,
                  spend_cap=spend_cap,
                  listeners=Listeners(on_token=on_token, on_switch=on_switch,
                                      on_reasoning=on_reasoning, on_tool_call=on_tool_call,
                                      on_restart=on_restart, before_try=before_try),
                  metrics=metrics, refused=set() if refused is None else refused,
                  backoff=backoff or Backoff(base_s=llm.retry_backoff_s,
                                             cap_s=llm.retry_backoff_cap_s))
    last: TransientError | None = None
    for position, alias in enumerate(chain):
        retry, refused_here = 0, False
        while walk.covered(alias):
            try:
                draft.finished = await walk.attempt(alias)
            except PrefillRefused:
                if refused_here:
                    raise
                refused_here = True
                continue  # once: the next try on this alias starts over, without a prefill
            except TransientError as exc:
                last = exc
                if retry < llm.retries:
                    retry += 1
                    await walk.retry(alias, retry, exc)
                    continue
                if position + 1 < len(chain):
                    await walk.fall_back(alias, chain[position + 1], exc)
                break
            return draft.answer()
        else:
            log.warning("%s: no retry, the job's budget reservation would not cover it",
                        alias.name)
    assert last is not None  # the first try is never held back
    raise ProviderExhausted(last, draft.tries)
