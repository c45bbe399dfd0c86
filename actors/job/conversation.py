"""conversation: one job, from claim to settled, in its own cancel scope and deadline.

claim (actors/job/claim.py) -> answer (answering.py) -> outcome (outcome.py) ->
terminal writes (finish.py). When this returns, the job's row and messages are
in Postgres and its `done` is in Redis, so the intake may commit its offset
(contract 6.1/6.2). Two scopes, one question each: the registry's cancel scope
outside (did the job's user cancel it?), the job's deadline inside.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import assert_never

import msgspec
import trio

from actors.aliases import Alias
from actors.backoff import retry_transient
from actors.errors import PermanentError, TransientError
from actors.job.answering import JobRun, answer
from actors.job.claim import claim_job, release_lease, resend_done
from actors.job.finish import count_usage, failed_record, finish, settle_failed, usage_of
from actors.job.outcome import decide
from actors.job.provider import Answer, prefill_taken
from actors.job.takeover import Plan, plan
from actors.logs import job_context
from actors.registry import RunningJob
from actors.telemetry import Timeline, error_type
from actors.worker import Worker
from messages.mailboxes import JobRef, JobRejected, Receipt, StreamFinished, Turn
from messages.ports import AlreadyTerminal, Claimed, Handed, OwnedByAnotherUser
from messages.telemetry import JobTelemetry, ModelCall, ModelTry
from messages.wire import ChatRequest, Error, Final, Started, Token

log = logging.getLogger("chat_actors.conversation")


@dataclass
class _Traced:
    """What the job's trace is made of, filled in as it runs."""

    timeline: Timeline = field(default_factory=Timeline)
    attempt: int = 1
    run: JobRun | None = None  # once claimed


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
        await _run_attempt(request, worker, msgspec.structs.replace(job, attempt=claimed.attempt),
                           claimed, chain=chain, traced=traced)


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


async def _run_attempt(request: ChatRequest, worker: Worker, job: JobRef, claimed: Claimed, *,
                       chain: tuple[Alias, ...], traced: _Traced) -> None:
    """The claimed attempt to a settled state, or handed back when stopped before it."""
    running = worker.registry.admit(job.job_id, job.user_id, job.attempt)
    worker.leases.hold(job.job_id)  # renewed by the lease keeper until the job is settled
    run = JobRun(answer=Answer(alias=chain[0].name), job=job, chain=chain,
                 timeline=traced.timeline)
    traced.attempt, traced.run = job.attempt, run
    started = trio.current_time()
    settled = False
    try:
        if job.attempt > 1 and not claimed.over_rejected:
            run.plan = await _take_over(worker, job, chain[0], claimed.handed)
        await _run_claimed(request, worker, job, running, claimed.history, run)
        settled = True
    except TransientError:
        raise
    except Exception as exc:  # outside the answer (its terminal writes): settle it as failed
        # (run.job: the attempt it ended as, its answer may have started over)
        error = _internal(worker, run.job, exc, where="finish")
        if not run.done_sent:  # else settled already: only counted and logged
            latency_ms = round((trio.current_time() - started) * 1000)
            await settle_failed(worker, run.job, failed_record(run.job, run, error.message,
                                                               latency_ms=latency_ms), error)
        settled = True
    finally:
        worker.leases.drop(job.job_id)
        worker.registry.finish(running)
        traced.attempt = run.job.attempt
        if not settled:
            # Cancelled from outside (shutdown) or not settled in time: hand the job back,
            # with its answer so far for the next attempt to continue.
            await release_lease(worker, job.job_id, _handed(worker, run.job, run))


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


def _settle_complete(worker: Worker, run: JobRun, final: Final) -> None:
    """The earlier attempt's answer was complete (its `final` is on the stream): this
    attempt ends the job with it and never calls the model. Its usage is counted in
    run.earlier; the budget the earlier attempt held is settled to it."""
    answer = run.answer
    if final.model in worker.aliases.by_name:
        answer.alias = final.model
    answer.finished = StreamFinished(finish_reason=final.finish_reason, prompt_tokens=None,
                                     completion_tokens=None, model=final.model)
    answer.tool_calls = list(final.tool_calls)
    answer.retries, answer.fallbacks = final.retries, final.fallbacks
    answer.nul_removed = final.nul_removed
    answer.reserved = True  # the earlier attempt's holds: settled to what it used
    run.sources_used = list(final.sources)


def _handed(worker: Worker, job: JobRef, run: JobRun) -> Handed:
    """What this attempt, stopped before its end, leaves the next one."""
    count_usage(worker, run)
    used, cost_usd = usage_of(run)
    return Handed(attempt=job.attempt, text=run.answer.text, reason=run.answer.midway,
                  usage=used, cost_usd=cost_usd)


def _internal(worker: Worker, job: JobRef, exc: Exception, *, where: str) -> Error:
    """An error nobody expected fails its job with error{internal}; the process and its
    other jobs go on. The traceback goes to the log (secrets redacted there), not to
    the client."""
    log.error("job %s failed on an unexpected error (%s)", job.job_id, where, exc_info=exc)
    worker.metrics.internal_errors.labels(where=where).inc()
    return Error(code="internal", retryable=False,
                 message=f"internal error ({type(exc).__name__}); see the worker's log")


async def _run_claimed(request: ChatRequest, worker: Worker, job: JobRef, running: RunningJob,
                       history: list[Turn], run: JobRun) -> None:
    plan = run.plan
    await worker.emit(job, Started(model=run.answer.alias, mode=request.mode,
                                   attempt=job.attempt,
                                   resumes=plan.resumes if plan is not None else None,
                                   restarts=plan.restarts if plan is not None else None))
    if plan is not None and plan.text:
        run.answer.parts.append(plan.text)
        run.answer.kept = 1
        if plan.unseen:  # handed back, never on the stream: the clients' copy ends before
            await worker.emit(job, Token(text=plan.unseen))
    started = trio.current_time()
    timeout_s = min(worker.config.jobs.timeout_s, request.timeout_s or math.inf)
    cancel = running.cancel_scope
    with cancel, trio.move_on_at(started + timeout_s) as deadline:
        # Cancelled before it started (a tombstone): never call the model.
        if not cancel.cancel_called:
            if plan is not None and plan.complete is not None:
                _settle_complete(worker, run, plan.complete)  # no model call
            else:
                await _answer(request, worker, job, history, run)
    if cancel.cancel_called:
        log.info("job %s cancelled: %s", job.job_id, running.cancel_reason)
    outcome = decide(cancel_requested=cancel.cancel_called, cancel_caught=cancel.cancelled_caught,
                     timed_out=deadline.cancelled_caught, timeout_s=timeout_s,
                     finished=run.answer.finished is not None, failure=run.failure,
                     text=run.answer.text, scrub=worker.scrub)
    run.status = outcome.status
    with run.timeline.step("sinks"):
        await finish(request, worker, run.job, run, outcome, started=started)


async def _answer(request: ChatRequest, worker: Worker, job: JobRef, history: list[Turn],
                  run: JobRun) -> None:
    """Call the model; what fails the job is kept in run.failure for the outcome."""
    try:
        await answer(request, worker, job, history, run)
    except (PermanentError, TransientError) as exc:
        run.failure = exc
    except Exception as exc:  # a bug, or a library error no adapter classified
        error = _internal(worker, job, exc, where="job")
        run.failure = PermanentError(error.message, code=error.code)


def _report(request: ChatRequest, worker: Worker, parent: str | None, trace_id: str,
            traced: _Traced) -> None:
    """Hand the job's record to the telemetry port; its trouble never reaches the job."""
    timeline, run = traced.timeline, traced.run
    status = run.status if run is not None and run.status else "settled"
    failed = _error_type(status, run)
    model = (_model_call(worker, run, run.model_started, status, failed)
             if run is not None and run.model_started is not None else None)
    try:
        worker.telemetry.job_ended(JobTelemetry(
            job_id=request.job_id, session_id=request.session_id, attempt=traced.attempt,
            topic=worker.config.kafka.request_topic, parent=parent, trace_id=trace_id,
            start_ns=timeline.start_ns, end_ns=timeline.ns(trio.current_time()),
            status=status, steps=list(timeline.steps), model_call=model, error_type=failed))
    except Exception:
        log.warning("job %s: its telemetry could not be recorded", request.job_id,
                    exc_info=True)


def _error_type(status: str, run: JobRun | None) -> str | None:
    """The job's `error.type`: none when it completed (or was settled already), else its
    status, or for a failure what failed."""
    if status == "failed":
        return error_type(run.failure) if run is not None and run.failure else "failed"
    return None if status in ("completed", "settled") else status


# The request parameters a model-call span names (gen_ai.request.*).
_SPAN_PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed")


def _model_call(worker: Worker, run: JobRun, started: float, status: str,
                failed: str | None) -> ModelCall:
    answer, timeline = run.answer, run.timeline
    asked = answer.timed[0].alias if answer.timed else answer.alias
    alias = worker.aliases[asked]
    ended = run.model_ended if run.model_ended is not None else trio.current_time()
    finished = answer.finished
    content = worker.telemetry.capture_content
    return ModelCall(
        alias=asked, model=alias.spec.model, provider=alias.provider,
        params={k: run.params[k] for k in _SPAN_PARAMS if k in run.params},
        start_ns=timeline.ns(started), end_ns=timeline.ns(ended),
        tries=[ModelTry(name=t.alias, model=t.model, start_ns=timeline.ns(t.started),
                        end_ns=timeline.ns(t.ended),
                        error_type="timeout" if t.error_type == "cancelled" and
                        status == "timeout" else t.error_type) for t in answer.timed],
        first_chunk_ns=None if answer.first_token_at is None else
        timeline.ns(answer.first_token_at),
        response_model=finished.model if finished else None,
        finish_reasons=[finished.finish_reason] if finished else [],
        input_tokens=answer.spent.used.prompt, output_tokens=answer.spent.used.completion,
        cache_read_tokens=answer.spent.used.cached,
        cache_creation_tokens=answer.spent.used.cache_write,
        reasoning_tokens=answer.spent.used.reasoning, error_type=failed,
        input_messages=run.messages if content else None,
        output_text=answer.text if content else None)
