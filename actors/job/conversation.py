"""conversation: one job, from claim to settled, in its own cancel scope and deadline.

claim (claim.py) -> take over (takeover.py) -> the `Attempt` (attempt.py) ->
prompt (answering.py) -> reserve (budget.py) -> stream the answer (answering.py,
provider.py) -> decide the outcome (outcome.py) -> terminal writes (finish.py). Each
step returns a value, and this module alone keeps them, in one `_Attempting`: what
the attempt's ending depends on lives in one place. When `run_conversation` returns,
the job's row and messages are in Postgres and its `done` is in Redis, so the intake
may commit its offset (contract 6.1/6.2). Two scopes, one question each: the
registry's cancel scope outside (did the job's user cancel it?), the job's deadline
inside.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, assert_never

import msgspec
import trio

from actors.aliases import Alias
from actors.backoff import retry_transient
from actors.errors import PermanentError, TransientError
from actors.job.answering import attached_images, build_prompt, model_params, stream
from actors.job.attempt import Answered, Attempt, Prompt
from actors.job.budget import Reservation, reserve
from actors.job.claim import claim_job, release_lease, resend_done, start_over
from actors.job.finish import (
    attempt_spend,
    failed_record,
    finish,
    job_spend,
    observe,
    settle_failed,
)
from actors.job.outcome import decide
from actors.job.provider import Answer, Draft, prefill_taken, sent_params
from actors.job.takeover import Plan, plan
from actors.logs import job_context
from actors.registry import RunningJob
from actors.telemetry import Timeline, error_type
from actors.worker import Worker
from messages.mailboxes import JobRef, JobRejected, Receipt, StoredImage, StreamFinished
from messages.ports import AlreadyTerminal, Claimed, Handed, OwnedByAnotherUser
from messages.telemetry import JobTelemetry, ModelCall, ModelTry
from messages.wire import ChatRequest, Error, Final, RestartReason, Started, Token

log = logging.getLogger("chat_actors.conversation")


class _Attempting:
    """The one place a running attempt's state lives: the value each step returned, the
    answer streaming in the provider's draft, and whether its terminal records are
    written. Steps return values; only this module records them here."""

    def __init__(self, attempt: Attempt, timeline: Timeline) -> None:
        self.attempt = attempt
        self.timeline = timeline
        self.draft = Draft(alias=attempt.alias.name)
        self.complete: Answer | None = None  # an earlier attempt's answer, settled as it is
        self.images: Sequence[StoredImage] = ()
        self.prompt: Prompt | None = None
        self.params: dict[str, Any] | None = None
        self.reservation = Reservation()
        self.failure: TransientError | PermanentError | None = None
        self.model_call: tuple[float, float | None] | None = None  # its Trio start, end
        self.status: str | None = None  # its done status, once decided
        self.settled = False  # its terminal records are written, or a later attempt's are

    def take_over(self, plan: Plan) -> None:
        self.attempt = self.attempt.taking_over(plan)
        alias = self.attempt.alias
        self.draft = Draft(alias=alias.name, carried=plan.text,
                           carried_tokens=alias.count(plan.text) if plan.text else 0)

    def answered(self) -> Answered:
        return Answered(attempt=self.attempt,
                        answer=self.complete or self.draft.answer(), images=self.images,
                        prompt=self.prompt, params=self.params, reservation=self.reservation,
                        failure=self.failure)


@dataclass
class _Traced:
    """What the job's trace is made of, filled in as it runs."""

    timeline: Timeline = field(default_factory=Timeline)
    attempt: int = 1
    now: _Attempting | None = None  # once claimed


async def run_conversation(request: ChatRequest, worker: Worker,
                           parent: str | None = None) -> None:
    """Run one job to a settled state; returns when its offset may be committed.
    `parent`: the request's W3C traceparent, which the job's trace continues."""
    trace_id = request.trace_id or uuid.uuid4().hex
    traced = _Traced()
    with job_context(trace_id=trace_id, job_id=request.job_id, user_id=request.user_id,
                     session_id=request.session_id):
        try:
            await _run_job(request, worker, trace_id, traced)
        finally:
            if worker.telemetry.enabled:
                _report(request, worker, parent, trace_id, traced)


async def _run_job(request: ChatRequest, worker: Worker, trace_id: str,
                   traced: _Traced) -> None:
    chain = worker.aliases.chain(request.model)
    job = worker.job_ref(request.job_id, request.user_id, request.session_id)
    claimed = await _claim(request, worker, job, trace_id=trace_id, alias=chain[0],
                           traced=traced)
    if claimed is not None:
        job = msgspec.structs.replace(job, attempt=claimed.attempt)
        await _run_attempt(worker, Attempt(request=request, job=job, chain=chain,
                                           history=tuple(claimed.history)), claimed, traced)


async def _claim(request: ChatRequest, worker: Worker, job: JobRef, *, trace_id: str,
                 alias: Alias, traced: _Traced) -> Claimed | None:
    """The job's lease for this worker, or None: not this worker's to run (settled here
    when it cannot be claimed at all)."""
    try:
        with traced.timeline.step("claim"):
            claim = await claim_job(request, worker, trace_id=trace_id, alias=alias)
    except TransientError:
        raise  # a dependency is away: the offset stays uncommitted, the job comes back
    except Exception as exc:  # a record refused, or a bug: redelivery would fail the same way
        error = _internal(worker, job, exc, where="claim")
        await settle_failed(worker, job, JobRejected(
            job_id=job.job_id, user_id=job.user_id, session_id=job.session_id,
            status="failed", error=f"internal: {error.message}", receipt=Receipt()), error)
        return None
    match claim:
        case Claimed(attempt=attempt, over_rejected=over_rejected):
            if over_rejected:
                await retry_transient(lambda: worker.event_log.hand_over(job.job_id, attempt),
                                      what="job id hand-over", log=log, health=worker.health,
                                      dependency="redis")
            return claim
        case AlreadyTerminal(status=status, attempt=attempt, partial=partial, ran=ran):
            # Redelivered after it finished (or fenced before any worker ran it): never
            # call the model again.
            log.info("job %s is already %s; not running it again", request.job_id, status)
            await resend_done(worker, msgspec.structs.replace(job, attempt=attempt), status,
                              partial, wait=ran)
        case OwnedByAnotherUser():
            log.warning("job %s belongs to another user; request from %s ignored",
                        request.job_id, request.user_id)
        case _:
            assert_never(claim)
    return None


async def _run_attempt(worker: Worker, attempt: Attempt, claimed: Claimed,
                       traced: _Traced) -> None:
    """The claimed attempt to a settled state, or handed back when stopped before it."""
    job = attempt.job
    running = worker.registry.admit(job.job_id, job.user_id, job.attempt)
    worker.leases.hold(job.job_id)  # renewed by the lease keeper until the job is settled
    now = traced.now = _Attempting(attempt, traced.timeline)
    traced.attempt = job.attempt
    started = trio.current_time()
    try:
        if job.attempt > 1 and not claimed.over_rejected:
            now.take_over(await _take_over(worker, job, attempt.alias, claimed.handed))
        await _run_claimed(worker, running, now)
    except TransientError:
        raise
    except Exception as exc:  # outside the answer (its terminal writes): settle it as failed
        await _settle_internal(worker, now, exc, started)
    finally:
        worker.leases.drop(job.job_id)
        worker.registry.finish(running)
        traced.attempt = now.attempt.job.attempt
        if not now.settled:
            # Cancelled from outside (shutdown) or not settled in time: hand the job back,
            # with its answer so far for the next attempt to continue.
            await release_lease(worker, job.job_id, _handed(worker, now.answered()))


async def _settle_internal(worker: Worker, now: _Attempting, exc: Exception,
                           started: float) -> None:
    """A bug outside the answer: the job fails with error{internal}, unless its terminal
    records are written already (then it is only counted and logged)."""
    answered = now.answered()
    job = answered.attempt.job  # the attempt it ended as: its answer may have started over
    error = _internal(worker, job, exc, where="finish")
    if not now.settled:
        latency_ms = round((trio.current_time() - started) * 1000)
        await settle_failed(worker, job, failed_record(
            answered, job_spend(worker, answered), error.message, latency_ms=latency_ms), error)
        now.settled = True


async def _take_over(worker: Worker, job: JobRef, alias: Alias,
                     handed: Handed | None) -> Plan:
    """Fence the earlier attempts out and decide what this one carries on from them."""
    try:
        entries = await retry_transient(
            lambda: worker.event_log.take_over(job.job_id, job.attempt),
            what="read-back of the job's stream", log=log, health=worker.health,
            dependency="redis")
    except PermanentError as exc:
        log.warning("job %s: its stream could not be read back (%s)", job.job_id, exc)
        entries = None
    continues, refused = prefill_taken(alias, worker.prefill_refused)
    found = plan(job.attempt, entries, handed, continues=continues, refused=refused)
    if found.resumes is not None:
        log.info("job %s: attempt %d continues attempt %d's answer (%d characters, %d of "
                 "them on the stream)", job.job_id, job.attempt, found.attempt,
                 len(found.text), found.resumes.chars)
        worker.metrics.takeovers.labels(result="resumed").inc()
    elif found.restarts is not None:
        log.info("job %s: attempt %d starts the answer over (%s)", job.job_id, job.attempt,
                 found.restarts.reason)
        worker.metrics.takeovers.labels(result=found.restarts.reason).inc()
    return found


def _settled_answer(worker: Worker, asked: str, carried: str, final: Final) -> Answer:
    """The earlier attempt's answer was complete (its `final` is on the stream): this
    attempt ends the job with it and never calls the model. Its usage is counted with the
    earlier attempts'; the budget the earlier attempt held is settled to it."""
    return Answer(
        text=carried, carried=carried,
        alias=final.model if final.model in worker.aliases.by_name else asked,
        finished=StreamFinished(finish_reason=final.finish_reason, prompt_tokens=None,
                                completion_tokens=None, model=final.model),
        tool_calls=tuple(final.tool_calls), retries=final.retries, fallbacks=final.fallbacks,
        nul_removed=final.nul_removed)


def _handed(worker: Worker, answered: Answered) -> Handed:
    """What this attempt, stopped before its end, leaves the next one."""
    total = job_spend(worker, answered)
    return Handed(attempt=answered.attempt.job.attempt, text=answered.answer.text,
                  reason=answered.answer.midway, usage=total.used, cost_usd=total.cost_usd)


def _internal(worker: Worker, job: JobRef, exc: Exception, *, where: str) -> Error:
    """An error nobody expected fails its job with error{internal}; the process and its
    other jobs go on. The traceback goes to the log (secrets redacted there), not to
    the client."""
    log.error("job %s failed on an unexpected error (%s)", job.job_id, where, exc_info=exc)
    worker.metrics.internal_errors.labels(where=where).inc()
    return Error(code="internal", retryable=False,
                 message=f"internal error ({type(exc).__name__}); see the worker's log")


async def _run_claimed(worker: Worker, running: RunningJob, now: _Attempting) -> None:
    attempt = now.attempt
    request, job, plan = attempt.request, attempt.job, attempt.plan
    await worker.emit(job, Started(model=attempt.alias.name, mode=request.mode,
                                   attempt=job.attempt,
                                   resumes=plan.resumes if plan is not None else None,
                                   restarts=plan.restarts if plan is not None else None))
    if plan is not None and plan.unseen:
        # Handed back, never on the stream: the clients' copy ends before it.
        await worker.emit(job, Token(text=plan.unseen))
    started = trio.current_time()
    timeout_s = min(worker.config.jobs.timeout_s, request.timeout_s or math.inf)
    cancel = running.cancel_scope
    with cancel, trio.move_on_at(started + timeout_s) as deadline:
        # Cancelled before it started (a tombstone): never call the model.
        if not cancel.cancel_called:
            if plan is not None and plan.complete is not None:  # no model call
                now.complete = _settled_answer(worker, attempt.alias.name, plan.text,
                                               plan.complete)
                now.reservation = Reservation(held=True)  # the earlier attempt's holds
                now.prompt = Prompt([], 0, None, list(plan.complete.sources))
            else:
                await _answer(worker, now)
    if cancel.cancel_called:
        log.info("job %s cancelled: %s", job.job_id, running.cancel_reason)
    answered = now.answered()
    outcome = decide(cancel_requested=cancel.cancel_called, cancel_caught=cancel.cancelled_caught,
                     timed_out=deadline.cancelled_caught, timeout_s=timeout_s,
                     finished=answered.answer.finished is not None, failure=answered.failure,
                     text=answered.answer.text, scrub=worker.scrub)
    now.status = outcome.status
    with now.timeline.step("sinks"):
        finished = await finish(request, worker, answered, outcome, started=started)
    now.settled = True
    if finished is not None:
        observe(worker, request.mode, finished)


async def _answer(worker: Worker, now: _Attempting) -> None:
    """prompt -> reserve -> stream, each step's value kept in `now` as it returns; what
    fails the job is kept there for the outcome."""
    try:
        await _steps(worker, now)
    except (PermanentError, TransientError) as exc:
        now.failure = exc
    except Exception as exc:  # a bug, or a library error no adapter classified
        error = _internal(worker, now.attempt.job, exc, where="job")
        now.failure = PermanentError(error.message, code=error.code)


async def _steps(worker: Worker, now: _Attempting) -> None:
    attempt = now.attempt
    alias = attempt.alias
    now.images, urls = attached_images(attempt.request, worker)
    params = now.params = model_params(attempt.request, alias.spec.max_tokens)
    prompt = now.prompt = await build_prompt(worker, attempt, params=params, images=now.images,
                                             urls=urls, timeline=now.timeline)
    # A continuation (takeover.py) sends the answer so far as the assistant turn's start:
    # the prompt holds it, and the answer only has the rest of its budget left.
    now.reservation = await reserve(worker, attempt.job, attempt.chain,
                                    prompt.estimate + now.draft.carried_tokens)

    async def restart(name: str, reason: RestartReason) -> JobRef:
        job = await start_over(worker, now.attempt.job, alias=name, mode=attempt.request.mode,
                               reason=reason)
        now.attempt = now.attempt.started_over(job)
        return job

    now.model_call = (trio.current_time(), None)
    try:
        await stream(worker, attempt, prompt, params, draft=now.draft,
                     spend_cap=now.reservation.cap_usd, restart=restart)
    finally:
        now.model_call = (now.model_call[0], trio.current_time())


def _report(request: ChatRequest, worker: Worker, parent: str | None, trace_id: str,
            traced: _Traced) -> None:
    """Hand the job's record to the telemetry port; its trouble never reaches the job."""
    timeline, now = traced.timeline, traced.now
    status = now.status if now is not None and now.status else "settled"
    failed = _error_type(status, now)
    model = (_model_call(worker, now, status, failed)
             if now is not None and now.model_call is not None else None)
    try:
        worker.telemetry.job_ended(JobTelemetry(
            job_id=request.job_id, session_id=request.session_id, attempt=traced.attempt,
            topic=worker.config.kafka.request_topic, parent=parent, trace_id=trace_id,
            start_ns=timeline.start_ns, end_ns=timeline.ns(trio.current_time()),
            status=status, steps=list(timeline.steps), model_call=model, error_type=failed))
    except Exception:
        log.warning("job %s: its telemetry could not be recorded", request.job_id,
                    exc_info=True)


def _error_type(status: str, now: _Attempting | None) -> str | None:
    """The job's `error.type`: none when it completed (or was settled already), else its
    status, or for a failure what failed."""
    if status == "failed":
        return error_type(now.failure) if now is not None and now.failure else "failed"
    return None if status in ("completed", "settled") else status


# The request parameters a model-call span names (gen_ai.request.*).
_SPAN_PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed")


def _model_call(worker: Worker, now: _Attempting, status: str,
                failed: str | None) -> ModelCall:
    answered, timeline = now.answered(), now.timeline
    answer, spent = answered.answer, attempt_spend(worker, answered).used
    asked = answer.timed[0].alias if answer.timed else answer.alias
    alias = worker.aliases[asked]
    assert now.model_call is not None
    started, ended = now.model_call
    finished = answer.finished
    content = worker.telemetry.capture_content
    params = sent_params(answered.params or {}, answer.carried_tokens)
    return ModelCall(
        alias=asked, model=alias.spec.model, provider=alias.provider,
        params={k: params[k] for k in _SPAN_PARAMS if k in params},
        start_ns=timeline.ns(started),
        end_ns=timeline.ns(ended if ended is not None else trio.current_time()),
        tries=[ModelTry(name=t.alias, model=t.model, start_ns=timeline.ns(t.started),
                        end_ns=timeline.ns(t.ended),
                        error_type="timeout" if t.error_type == "cancelled" and
                        status == "timeout" else t.error_type) for t in answer.timed],
        first_chunk_ns=None if answer.first_token_at is None else
        timeline.ns(answer.first_token_at),
        response_model=finished.model if finished else None,
        finish_reasons=[finished.finish_reason] if finished else [],
        input_tokens=spent.prompt, output_tokens=spent.completion,
        cache_read_tokens=spent.cached, cache_creation_tokens=spent.cache_write,
        reasoning_tokens=spent.reasoning, error_type=failed,
        input_messages=answered.prompt.messages if content and answered.prompt else None,
        output_text=answer.text if content else None)
