"""conversation: one job, from claim to settled, in its own cancel scope and deadline.

claim (actors/claim.py) -> answer (answering.py) -> outcome (outcome.py) ->
terminal writes (finish.py). When this returns, the job's row and messages are
in Postgres and its `done` is in Redis, so the intake may commit its offset
(contract 6.1/6.2). Two scopes, one question each: the registry's cancel scope
outside (did the job's user cancel it?), the job's deadline inside.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import assert_never

import msgspec
import trio

from actors.answering import JobRun, answer
from actors.backoff import retry_transient
from actors.claim import claim_job, release_lease, resend_done
from actors.errors import PermanentError, TransientError
from actors.finish import failed_record, finish, settle_failed
from actors.logs import job_context
from actors.outcome import decide
from actors.provider import Answer
from actors.registry import RunningJob
from actors.worker import Worker
from messages.mailboxes import JobRef, JobRejected, Receipt, Turn
from messages.ports import AlreadyTerminal, Claimed, OwnedByAnotherUser
from messages.wire import ChatRequest, Error, Started

log = logging.getLogger("chat_actors.conversation")


async def run_conversation(request: ChatRequest, worker: Worker) -> None:
    """Run one job to a settled state; returns when its offset may be committed."""
    trace_id = request.trace_id or uuid.uuid4().hex
    with job_context(trace_id=trace_id, job_id=request.job_id, user_id=request.user_id,
                     session_id=request.session_id):
        await _run_job(request, worker, trace_id)


async def _run_job(request: ChatRequest, worker: Worker, trace_id: str) -> None:
    alias_name, _ = worker.config.alias(request.model)
    job = worker.job_ref(request.job_id, request.user_id, request.session_id)
    try:
        claim = await claim_job(request, worker, trace_id=trace_id, alias_name=alias_name)
    except TransientError:
        raise  # a dependency is away: the offset stays uncommitted, the job comes back
    except Exception as exc:  # a record refused, or a bug: redelivery would fail the same way
        error = _internal(worker, job, exc, where="claim")
        await settle_failed(worker, job, JobRejected(
            job_id=job.job_id, user_id=job.user_id, session_id=job.session_id,
            status="failed", error=f"internal: {error.message}", receipt=Receipt()), error)
        return
    match claim:
        case Claimed(attempt=attempt, history=history, over_rejected=over_rejected):
            if over_rejected:
                await retry_transient(lambda: worker.event_log.hand_over(job.job_id, attempt),
                                      what="job id hand-over", log=log, health=worker.health,
                                      dependency="redis")
        case AlreadyTerminal(status=status, attempt=attempt, partial=partial):
            # Redelivered after it finished: never call the model again.
            log.info("job %s is already %s; not running it again", request.job_id, status)
            await resend_done(worker, msgspec.structs.replace(job, attempt=attempt), status,
                              partial)
            return
        case OwnedByAnotherUser():
            log.warning("job %s belongs to another user; request from %s ignored",
                        request.job_id, request.user_id)
            return
        case _:
            assert_never(claim)
    job = msgspec.structs.replace(job, attempt=attempt)
    running = worker.registry.admit(job.job_id, job.user_id, job.attempt)
    worker.leases.hold(job.job_id)  # renewed by the lease keeper until the job is settled
    run = JobRun(answer=Answer(alias=alias_name))
    started = trio.current_time()
    settled = False
    try:
        await _run_claimed(request, worker, job, running, history, run)
        settled = True
    except TransientError:
        raise
    except Exception as exc:  # outside the answer (its terminal writes): settle it as failed
        error = _internal(worker, job, exc, where="finish")
        if not run.done_sent:  # else settled already: only counted and logged
            latency_ms = round((trio.current_time() - started) * 1000)
            await settle_failed(worker, job, failed_record(job, run, error.message,
                                                           latency_ms=latency_ms), error)
        settled = True
    finally:
        worker.leases.drop(job.job_id)
        worker.registry.finish(running)
        if not settled:
            # Cancelled from outside (shutdown) or not settled in time: hand the job back.
            await release_lease(worker, job.job_id)


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
    await worker.emit(job, Started(model=run.answer.alias, mode=request.mode,
                                   attempt=job.attempt))
    started = trio.current_time()
    timeout_s = min(worker.config.jobs.timeout_s, request.timeout_s or math.inf)
    cancel = running.cancel_scope
    with cancel, trio.move_on_at(started + timeout_s) as deadline:
        # Cancelled before it started (a tombstone): never call the model.
        if not cancel.cancel_called:
            try:
                await answer(request, worker, job, history, run)
            except (PermanentError, TransientError) as exc:
                run.failure = exc
            except Exception as exc:  # a bug, or a library error no adapter classified
                error = _internal(worker, job, exc, where="job")
                run.failure = PermanentError(error.message, code=error.code)
    if cancel.cancel_called:
        log.info("job %s cancelled: %s", job.job_id, running.cancel_reason)
    outcome = decide(cancel_requested=cancel.cancel_called, cancel_caught=cancel.cancelled_caught,
                     timed_out=deadline.cancelled_caught, timeout_s=timeout_s,
                     finished=run.answer.finished is not None, failure=run.failure,
                     text=run.answer.text, scrub=worker.scrub)
    await finish(request, worker, job, run, outcome, started=started)
