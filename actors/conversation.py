"""conversation: one job, from claim to settled, in its own nursery and deadline.

history -> messages within the token budget -> provider stream -> events.
The terminal order is the guarantee of DESIGN 4.1/4.2: the job's row and
messages are committed in Postgres, then its `done` reaches Redis, and only
then does this function return so the intake may commit the offset.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from actors.adapters.llm import provider_of
from actors.adapters.postgres import (
    AlreadyTerminal,
    Claimed,
    Hold,
    LeasedElsewhere,
    OwnedByAnotherUser,
)
from actors.adapters.tokens import TokenCounter
from actors.backoff import retry_transient
from actors.errors import PermanentError, TransientError
from actors.health import Health
from actors.leases import LeaseKeeper
from actors.logs import job_context
from actors.metrics import Metrics
from actors.ports import ChatModel, EventWriter, JobStore
from actors.prompt import build_messages, sources_message
from actors.provider import Answer, ProviderExhausted, Stalled, stream_answer, worst_try_usd
from actors.registry import JobRegistry, RunningJob
from actors.retriever import Retrieval, Retrieved
from config import Config
from messages.mailboxes import EventEmitted, JobFinished, JobRef, PgSinkMessage, Turn
from messages.wire import (
    ChatRequest,
    Done,
    DoneStatus,
    Error,
    EventBody,
    Final,
    ProviderSwitched,
    RetrievalHit,
    Started,
    Token,
    Usage,
)
from messages.wire import (
    Retrieval as RetrievalEvent,
)

log = logging.getLogger("chat_actors.conversation")

# How long cleanup that must happen (records, `done`, lease release) may take
# once the job itself is over or cancelled.
FINISH_GRACE_S = 30.0
# A PermanentError with one of these codes refuses the job before any model call.
REFUSALS = ("budget_exceeded", "rate_limited")
SNIPPET_CHARS = 200


@dataclass
class Worker:
    """What every conversation of one worker shares. Passed in, never global."""

    config: Config
    owner: str  # this worker's id, written as lease_owner
    store: JobStore
    chat: ChatModel
    events: trio.MemorySendChannel[EventEmitted]
    records: trio.MemorySendChannel[PgSinkMessage]
    event_log: EventWriter
    registry: JobRegistry
    health: Health = field(default_factory=Health)
    retriever: Retrieval | None = None  # RAG mode; None: rag requests fail clearly
    leases: LeaseKeeper = field(default_factory=LeaseKeeper)
    metrics: Metrics = field(default_factory=Metrics)
    # Takes secrets (API keys a vendor echoed back) out of text bound for events and rows.
    scrub: Callable[[str], str] = field(default=str)
    _counters: dict[str, TokenCounter] = field(default_factory=dict)

    def counter(self, model: str) -> Callable[[str], int]:
        if model not in self._counters:
            self._counters[model] = TokenCounter(model)
        return self._counters[model].count

    def stream_key(self, job_id: str) -> str:
        return self.config.stream.key_template.replace("{job_id}", job_id)

    async def emit(self, job: JobRef, body: EventBody, *, wait: bool = False) -> None:
        receipt = trio.Event() if wait else None
        await self.events.send(EventEmitted(job=job, body=body, receipt=receipt))
        if receipt is not None:
            await receipt.wait()


def _params(request: ChatRequest, answer_tokens: int) -> dict[str, Any]:
    p = request.params
    params: dict[str, Any] = {"max_tokens": min(p.max_tokens or answer_tokens, answer_tokens)}
    if p.temperature is not None:
        params["temperature"] = p.temperature
    if p.top_p is not None:
        params["top_p"] = p.top_p
    if p.stop:
        params["stop"] = p.stop
    return params


async def run_conversation(request: ChatRequest, worker: Worker) -> None:
    """Run one job to a settled state; returns when its offset may be committed."""
    trace_id = request.trace_id or uuid.uuid4().hex
    with job_context(trace_id=trace_id, job_id=request.job_id, user_id=request.user_id,
                     session_id=request.session_id):
        await _run_job(request, worker, trace_id)


async def _run_job(request: ChatRequest, worker: Worker, trace_id: str) -> None:
    config = worker.config
    alias_name, alias = config.alias(request.model)
    provider = provider_of(alias.model)
    while True:
        claim = await retry_transient(
            lambda: worker.store.claim(
                job_id=request.job_id, user_id=request.user_id, session_id=request.session_id,
                trace_id=trace_id, mode=request.mode, model=alias_name,
                provider=provider, owner=worker.owner, lease_s=config.jobs.lease_s,
                history_limit=config.llm.max_history_turns),
            what=f"claim of job {request.job_id}", log=log, health=worker.health,
            dependency="postgres")
        if not isinstance(claim, LeasedElsewhere):
            break
        # Another worker holds a live lease. Skipping would commit the offset, and if
        # that worker has died the job would be lost: wait until it finishes the job
        # (terminal) or its lease runs out (we take over as the next attempt).
        log.info("job %s is leased by %s; waiting for it to finish or expire",
                 request.job_id, claim.owner)
        await trio.sleep(config.jobs.lease_s / 3)
    job = JobRef(job_id=request.job_id, user_id=request.user_id, session_id=request.session_id,
                 attempt=1, stream_key=worker.stream_key(request.job_id))
    match claim:
        case Claimed(attempt=attempt, history=history):
            job = JobRef(job_id=job.job_id, user_id=job.user_id, session_id=job.session_id,
                         attempt=attempt, stream_key=job.stream_key)
        case AlreadyTerminal(status=status, attempt=attempt, partial=partial):
            # Redelivered after it finished: never call the model again. If the
            # crash came between Postgres and Redis, the client still gets its `done`.
            log.info("job %s is already %s; not running it again", job.job_id, status)
            await _resend_done(worker, msgspec.structs.replace(job, attempt=attempt),
                               status, partial)  # type: ignore[arg-type]
            return
        case OwnedByAnotherUser():
            log.warning("job %s belongs to another user; request from %s ignored",
                        job.job_id, job.user_id)
            return
    settled = False
    running = worker.registry.admit(job.job_id, job.user_id)
    worker.leases.hold(job.job_id)  # renewed by the lease keeper until the job is settled
    try:
        await _run_claimed(request, worker, job, alias_name, running, history)
        settled = True
    finally:
        worker.leases.drop(job.job_id)
        worker.registry.finish(running)
        if not settled:
            # Cancelled from outside (shutdown) or crashed: hand the job back so
            # the redelivery runs it at once instead of waiting out the lease.
            with trio.move_on_after(FINISH_GRACE_S, shield=True):
                try:
                    await worker.store.release_lease(job_id=job.job_id, owner=worker.owner)
                except TransientError as exc:
                    log.warning("job %s: lease not released (%s); it expires", job.job_id, exc)


async def _retrieve(request: ChatRequest, worker: Worker, job: JobRef) -> Retrieved:
    """Search the user's collections and tell the client each step, before any token."""
    if worker.retriever is None:
        raise PermanentError("RAG is not available on this worker", code="rag_unavailable")
    options = request.rag
    retrieved = await worker.retriever.search(
        query=request.message, user_id=job.user_id,
        collection=options.collection if options else None,
        top_k=options.top_k if options else worker.config.rag.top_k,
        where=options.where if options else None)
    for step in retrieved.steps:
        await worker.emit(job, RetrievalEvent(step=step.step, query=step.query, hits=[
            RetrievalHit(id=h.id, score=round(h.score, 4), source=h.source,
                         snippet=h.text[:SNIPPET_CHARS]) for h in step.hits]))
    return retrieved


async def _resend_done(worker: Worker, job: JobRef, status: DoneStatus, partial: bool) -> None:
    """Write the `done` a crash lost, continuing that attempt's sequence."""

    async def redis(op):  # type: ignore[no-untyped-def]
        return await retry_transient(op, what="done check", log=log, health=worker.health,
                                     dependency="redis")

    if await redis(lambda: worker.event_log.done_recorded(job.job_id)):
        return
    last = await redis(lambda: worker.event_log.last_seq(job.job_id, job.attempt))
    receipt = trio.Event()
    await worker.events.send(EventEmitted(job=job, body=Done(status=status, partial=partial),
                                          receipt=receipt, first_seq=last + 1))
    await receipt.wait()


async def _run_claimed(request: ChatRequest, worker: Worker, job: JobRef,
                       alias_name: str, running: RunningJob, history: list[Turn]) -> None:
    config = worker.config
    alias = config.llm.models[alias_name]
    count = worker.counter(alias.model)
    await worker.emit(job, Started(model=alias_name, mode=request.mode, attempt=job.attempt))
    started = trio.current_time()
    answer = Answer(alias=alias_name)
    failure: TransientError | PermanentError | None = None
    prompt_estimate = 0
    timeout_s = min(config.jobs.timeout_s, request.timeout_s or math.inf)

    retrieved: Retrieved | None = None
    sources_used: list[str] = []

    async def answer_request() -> None:
        nonlocal prompt_estimate, retrieved, sources_used
        context = ""
        if request.mode == "rag":
            retrieved = await _retrieve(request, worker, job)
            budget = int(config.rag.context_share * (alias.context_window - alias.max_tokens))
            context, kept = sources_message([(h.source, h.text) for h in retrieved.hits],
                                            budget_tokens=budget, count=count)
            sources_used = [h.id for h in retrieved.hits[:kept]]
        messages, prompt_estimate = build_messages(
            system_prompt=config.llm.system_prompt, history=history,
            user_message=request.message, context_window=alias.context_window,
            answer_tokens=alias.max_tokens, count=count, context=context)
        if config.log.content:
            log.debug("prompt: %s", messages)
        answer.spend_cap, answer.reserved = await _reserve(worker, job, alias_name,
                                                           prompt_estimate)
        await stream_answer(
            chat=worker.chat, config=config, alias_name=alias_name, messages=messages,
            params=_params(request, alias.max_tokens), count=count,
            prompt_estimate=prompt_estimate, answer=answer,
            on_token=lambda text: worker.emit(job, Token(text=text)),
            on_switch=lambda old, new, why: worker.emit(
                job, ProviderSwitched(from_=old, to=new, reason=worker.scrub(why))),
            metrics=worker.metrics)

    status: DoneStatus = "completed"
    error: Error | None = None
    scope = running.scope  # the registry cancels it on the owner's cancel
    scope.deadline = min(scope.deadline, started + timeout_s)
    with scope:
        # Cancelled before it started (a tombstone): never call the model.
        if running.cancel_reason is None:
            try:
                await answer_request()
            except (PermanentError, TransientError) as exc:
                failure = exc
    if running.cancel_reason is not None and (scope.cancelled_caught or answer.finished is None):
        status = "cancelled"
    elif scope.cancelled_caught:
        status = "timeout"
        error = Error(code="timeout", retryable=True,
                      message=f"the job took longer than its {timeout_s:g} s timeout")
    elif isinstance(failure, ProviderExhausted) and isinstance(failure.last, Stalled):
        status = "timeout"
        error = Error(code=failure.last.code, retryable=True, message=worker.scrub(str(failure)))
    elif isinstance(failure, PermanentError) and failure.code in REFUSALS:
        status = "rejected"  # over a budget or rate limit: no model call was made
        error = Error(code=failure.code, message=worker.scrub(str(failure)),
                      retryable=failure.code == "rate_limited")
    elif failure is not None:
        status = "failed"
        error = Error(code=getattr(failure, "code", "provider_unavailable"),
                      message=worker.scrub(str(failure)),
                      retryable=isinstance(failure, TransientError))

    text = answer.text
    if answer.finished is None and answer.tries and failure is None:
        # Cut off mid-try (cancel, timeout): bill what the vendor produced before it.
        # (A try that failed was billed by the provider, if it streamed at all.)
        unbilled = count(text) - answer.completion_tokens
        answer.bill(config.llm.models[answer.alias], prompt_estimate, max(unbilled, 0))
    prompt_tokens, completion_tokens = answer.prompt_tokens, answer.completion_tokens
    cost = answer.cost_usd if answer.tries else 0.0
    partial_answer = status != "completed" and bool(text)
    ended = trio.current_time()
    first_token_at = answer.first_token_at
    finished = answer.finished
    answered_by = answer.alias
    vendor = provider_of(config.llm.models[answered_by].model)

    with trio.move_on_after(FINISH_GRACE_S, shield=True) as finishing:
        if status == "completed" and finished is not None:
            await worker.emit(job, Final(
                text=text, finish_reason=finished.finish_reason,
                usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens),
                cost_usd=cost, model=answered_by, sources=sources_used, provider=vendor,
                retries=answer.retries, fallbacks=answer.fallbacks))
        elif error is not None:
            await worker.emit(job, error)
        persisted = trio.Event()
        await worker.records.send(JobFinished(
            job_id=job.job_id, user_id=job.user_id, session_id=job.session_id, status=status,
            model=answered_by, provider=vendor, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, cost_usd=cost,
            ttft_ms=None if first_token_at is None else round((first_token_at - started) * 1000),
            latency_ms=round((ended - started) * 1000),
            error=None if error is None else f"{error.code}: {error.message}",
            partial=partial_answer,
            user_message=request.message, user_tokens=count(request.message), answer=text,
            retrieval_ms=retrieved.elapsed_ms if retrieved else None,
            retrieval_hits=len(sources_used) if retrieved else None,
            retries=answer.retries, fallbacks=answer.fallbacks,
            reserved=answer.reserved, receipt=persisted))
        await persisted.wait()
        await worker.emit(job, Done(status=status, partial=partial_answer), wait=True)
    if finishing.cancelled_caught:
        raise TransientError(f"job {job.job_id}: terminal records not persisted in time")
    _count(worker, request.mode, status, answered_by, prompt_tokens, completion_tokens, cost,
           None if first_token_at is None else first_token_at - started, ended - started)
    if status == "rejected" and error is not None:
        worker.metrics.rejections.labels(reason=error.code).inc()
    log.log(logging.INFO if error is None else logging.WARNING,
            "job %s %s in %.0f ms (%d+%d tokens, $%s, %d retries, %d fallbacks)%s", job.job_id,
            status, (ended - started) * 1000, prompt_tokens, completion_tokens,
            "?" if cost is None else f"{cost:.6f}", answer.retries, answer.fallbacks,
            "" if error is None else f": {error.code}: {error.message}")


def _count(worker: Worker, mode: str, status: str, model: str, prompt_tokens: int,
           completion_tokens: int, cost: float | None, ttft_s: float | None,
           latency_s: float) -> None:
    metrics = worker.metrics
    metrics.jobs.labels(status=status, mode=mode).inc()
    metrics.tokens.labels(direction="prompt", model=model).inc(prompt_tokens)
    metrics.tokens.labels(direction="completion", model=model).inc(completion_tokens)
    if cost:
        metrics.cost.labels(model=model).inc(cost)
    if ttft_s is not None:
        metrics.ttft.labels(model=model).observe(ttft_s)
    metrics.latency.labels(model=model).observe(latency_s)


async def _reserve(worker: Worker, job: JobRef, alias_name: str,
                   prompt_tokens: int) -> tuple[float | None, bool]:
    """Reserve the job's worst case against the user's limits; return the USD cap it
    may spend (None: no USD limit) and whether anything is reserved. Raises
    PermanentError over a limit."""
    config = worker.config
    budgets = config.budgets
    alias = config.llm.models[alias_name]
    worst_usd = max(worst_try_usd(spec, prompt_tokens, alias.max_tokens)
                    for spec in (alias, *(config.llm.models[f] for f in alias.fallbacks)))
    holds: list[Hold] = []
    for scope, limit in budgets.for_user(job.user_id):
        if limit.usd:
            holds.append(Hold(scope=scope, kind="usd", amount=worst_usd, limit=limit.usd))
        if limit.rpm:
            holds.append(Hold(scope=scope, kind="requests", amount=1, limit=limit.rpm))
        if limit.tpm:
            holds.append(Hold(scope=scope, kind="tokens", amount=prompt_tokens + alias.max_tokens,
                              limit=limit.tpm))
    if not holds:
        return None, False
    refused = await retry_transient(
        lambda: worker.store.reserve(job_id=job.job_id, owner=worker.owner, holds=holds,
                                     period=budgets.period),
        what="budget reservation", log=log, health=worker.health, dependency="postgres")
    if refused is None:
        return (worst_usd if any(h.kind == "usd" for h in holds) else None), True
    what = {"usd": f"USD budget per {budgets.period}", "requests": "requests per minute",
            "tokens": "tokens per minute"}[refused.kind]
    log.warning("job %s refused: %s over its %s", job.job_id, refused.scope, what)
    raise PermanentError(
        f"{refused.scope} is over its {what}: this job needs {refused.amount:g}, "
        f"{refused.taken:g} of {refused.limit:g} is used or reserved",
        code="budget_exceeded" if refused.kind == "usd" else "rate_limited")


