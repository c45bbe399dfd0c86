"""conversation: one job, from claim to settled, in its own cancel scope and deadline.

claim (actors/claim.py) -> answer (answering.py) -> outcome (outcome.py) ->
terminal writes (finish.py). When this returns, the job's row and messages are
in Postgres and its `done` is in Redis, so the intake may commit its offset
(DESIGN 4.1/4.2). Two scopes, one question each: the registry's cancel scope
outside (did the job's user cancel it?), the job's deadline inside.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import assert_never

import trio

from actors.answering import JobRun, answer
from actors.claim import claim_job, release_lease, resend_done
from actors.errors import PermanentError, TransientError
from actors.finish import finish
from actors.logs import job_context
from actors.outcome import decide
from actors.provider import Answer
from actors.registry import RunningJob
from actors.worker import Worker
from messages.mailboxes import JobRef, Turn
from messages.ports import AlreadyTerminal, Claimed, OwnedByAnotherUser
from messages.wire import ChatRequest, Started

log = logging.getLogger("chat_actors.conversation")


async def run_conversation(request: ChatRequest, worker: Worker) -> None:
    """Run one job to a settled state; returns when its offset may be committed."""
    trace_id = request.trace_id or uuid.uuid4().hex
    with job_context(trace_id=trace_id, job_id=request.job_id, user_id=request.user_id,
                     session_id=request.session_id):
        await _run_job(request, worker, trace_id)


async def _run_job(request: ChatRequest, worker: Worker, trace_id: str) -> None:
    alias_name, _ = worker.config.alias(request.model)
    claim = await claim_job(request, worker, trace_id=trace_id, alias_name=alias_name)
    match claim:
        case Claimed(attempt=attempt, history=history):
            pass
        case AlreadyTerminal(status=status, attempt=attempt, partial=partial):
            # Redelivered after it finished: never call the model again.
            log.info("job %s is already %s; not running it again", request.job_id, status)
            job = worker.job_ref(request.job_id, request.user_id, request.session_id, attempt)
            await resend_done(worker, job, status, partial)
            return
        case OwnedByAnotherUser():
            log.warning("job %s belongs to another user; request from %s ignored",
                        request.job_id, request.user_id)
            return
        case _:
            assert_never(claim)
    job = worker.job_ref(request.job_id, request.user_id, request.session_id, attempt)
    running = worker.registry.admit(job.job_id, job.user_id)
    worker.leases.hold(job.job_id)  # renewed by the lease keeper until the job is settled
    settled = False
    try:
        await _run_claimed(request, worker, job, alias_name, running, history)
        settled = True
    finally:
        worker.leases.drop(job.job_id)
        worker.registry.finish(running)
        if not settled:
            # Cancelled from outside (shutdown) or crashed: hand the job back.
            await release_lease(worker, job.job_id)


def _internal(worker: Worker, job: JobRef, exc: Exception) -> PermanentError:
    """The job ends `failed` with error{internal}: the process and its other jobs go on.
    The traceback goes to the log (secrets redacted there), not to the client."""
    log.error("job %s failed on an unexpected error", job.job_id, exc_info=exc)
    worker.metrics.internal_errors.labels(where="job").inc()
    return PermanentError(f"internal error ({type(exc).__name__}); see the worker's log",
                          code="internal")


async def _run_claimed(request: ChatRequest, worker: Worker, job: JobRef, alias_name: str,
                       running: RunningJob, history: list[Turn]) -> None:
    await worker.emit(job, Started(model=alias_name, mode=request.mode, attempt=job.attempt))
    started = trio.current_time()
    run = JobRun(answer=Answer(alias=alias_name))
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
                run.failure = _internal(worker, job, exc)
    if cancel.cancel_called:
        log.info("job %s cancelled: %s", job.job_id, running.cancel_reason)
    outcome = decide(cancel_requested=cancel.cancel_called, cancel_caught=cancel.cancelled_caught,
                     timed_out=deadline.cancelled_caught, timeout_s=timeout_s,
                     finished=run.answer.finished is not None, failure=run.failure,
                     text=run.answer.text, scrub=worker.scrub)
    await finish(request, worker, job, run, outcome, started=started)
