"""claim: take a job's lease in llm_jobs, or learn why this worker must not run it.

contract 6.1: a new job runs as attempt 1, a job whose lease expired as the next
attempt; a job under a live lease elsewhere is waited for (skipping it would
commit its offset, and if that worker has died the job would be lost); a job
that is already terminal is never run again, but its `done` is re-sent in case
a crash came between Postgres and Redis.
"""

from __future__ import annotations

import logging
from typing import assert_never

import trio

from actors.aliases import Alias
from actors.backoff import retry_transient
from actors.errors import PermanentError, TransientError
from actors.worker import FINISH_GRACE_S, Worker
from messages.mailboxes import EventEmitted, JobRef, Receipt
from messages.ports import (
    AlreadyTerminal,
    Claimed,
    ClaimOrder,
    ClaimResult,
    Handed,
    LeasedElsewhere,
    OwnedByAnotherUser,
)
from messages.wire import ChatRequest, Done, DoneStatus, RestartReason, Restarts, Started

log = logging.getLogger("chat_actors.claim")


async def claim_job(request: ChatRequest, worker: Worker, *, trace_id: str,
                    alias: Alias) -> Claimed | AlreadyTerminal | OwnedByAnotherUser:
    """Claim the job, waiting while another worker holds a live lease on it."""
    config = worker.config
    order = ClaimOrder(job_id=request.job_id, user_id=request.user_id,
                       session_id=request.session_id, trace_id=trace_id, mode=request.mode,
                       model=alias.name, provider=alias.provider,
                       api_key_id=request.api_key_id, end_user=request.end_user,
                       metadata=request.metadata)

    async def claim_once() -> ClaimResult:
        if worker.claims is not None:  # with every job claiming at the same time
            return await worker.claims.claim(order)
        return await worker.store.claim(
            job_id=order.job_id, user_id=order.user_id, session_id=order.session_id,
            trace_id=trace_id, mode=order.mode, model=order.model, provider=order.provider,
            lease_holder=worker.worker_id, lease_s=config.jobs.lease_s,
            # A carried history (v3) is the whole conversation: none is read.
            history_limit=0 if request.carried else config.llm.max_history_turns,
            api_key_id=order.api_key_id, end_user=order.end_user, metadata=order.metadata)

    while True:
        claim = await retry_transient(claim_once, what=f"claim of job {request.job_id}",
                                      log=log, health=worker.health, dependency="postgres")
        match claim:
            case LeasedElsewhere(lease_holder=holder):
                # Wait until that worker finishes the job (terminal) or its lease runs
                # out (we take over as the next attempt).
                log.info("job %s is leased by %s; waiting for it to finish or expire",
                         request.job_id, holder)
                await trio.sleep(config.jobs.lease_s / 3)
            case Claimed() | AlreadyTerminal() | OwnedByAnotherUser():
                return claim
            case _:
                assert_never(claim)


async def resend_done(worker: Worker, job: JobRef, status: DoneStatus, partial: bool, *,
                      wait: bool = True) -> None:
    """Write the `done` a crash lost, continuing that attempt's sequence. `wait` False:
    no worker ran the job, so none is about to write its `done`."""

    async def done_recorded() -> bool:
        return await worker.event_log.done_recorded(job.job_id)

    async def last_seq() -> int:
        return await worker.event_log.last_seq(job.job_id, job.attempt)

    # The worker that ended the job writes its `done` right after the terminal row (its
    # `final` or `error` is in Redis before that row): wait for it a lease long before
    # taking it for lost, so one `done` of its own usually ends the stream.
    deadline = trio.current_time() + (worker.config.jobs.lease_s if wait else 0.0)
    while await retry_transient(done_recorded, what="done check", log=log,
                                health=worker.health, dependency="redis") is False:
        if trio.current_time() >= deadline:
            break
        await trio.sleep(0.2)
    else:
        return
    last = await retry_transient(last_seq, what="done check", log=log, health=worker.health,
                                 dependency="redis")
    receipt = Receipt()
    await worker.events.send(EventEmitted(job=job, body=Done(status=status, partial=partial),
                                          receipt=receipt, first_seq=last + 1))
    await receipt.wait()


async def start_over(worker: Worker, job: JobRef, *, alias: str, mode: str,
                     reason: RestartReason) -> JobRef:
    """The job's answer starts over inside this worker as its next attempt (contract
    3.3): the attempt moves on in Postgres under the same lease (fencing this one's
    terminal write), then `started{restarts}` opens the new attempt's events (fencing
    this one's in Redis). A job no longer held is stopped: a later attempt ends it."""
    moved = await retry_transient(
        lambda: worker.store.next_attempt(job_id=job.job_id, lease_holder=worker.worker_id,
                                          attempt=job.attempt),
        what="start over", log=log, health=worker.health, dependency="postgres")
    if not moved:
        await _stopped(worker, job, "a later attempt holds the job")
        raise PermanentError("a later attempt holds the job", code="superseded")
    following = JobRef(job_id=job.job_id, user_id=job.user_id, session_id=job.session_id,
                       attempt=job.attempt + 1, stream_key=job.stream_key)
    worker.registry.moved_on(job.job_id, following.attempt)
    worker.metrics.restarts.labels(reason=reason).inc()
    log.info("job %s: attempt %d starts the answer over as attempt %d (%s)", job.job_id,
             job.attempt, following.attempt, reason)
    await worker.emit(following, Started(model=alias, mode=mode, attempt=following.attempt,
                                         restarts=Restarts(attempt=job.attempt, reason=reason)))
    return following


async def check_fence(worker: Worker, job: JobRef) -> None:
    """Stop the job before a model call if a later attempt holds it or it has ended
    (a worker waking from a freeze): the vendor is never paid for an answer nobody
    gets. Redis away: the call goes ahead, its fenced writes still keep it out."""
    try:
        fenced = await worker.event_log.fenced(job.job_id, job.attempt)
    except (TransientError, PermanentError) as exc:
        log.debug("job %s: its fence could not be read (%s)", job.job_id, exc)
        return
    if fenced:
        log.warning("job %s: attempt %d is superseded or the job has ended; no model call",
                    job.job_id, job.attempt)
        worker.metrics.fenced_calls.inc()
        await _stopped(worker, job, "a later attempt holds the job, or it has ended")


async def _stopped(worker: Worker, job: JobRef, why: str) -> None:
    """Stop this attempt of the job as superseded (contract 6.11): its cancel scope is
    cancelled, which takes effect at this checkpoint."""
    worker.registry.stop(job.job_id, f"superseded: {why}", job.attempt)
    await trio.lowlevel.checkpoint()


async def release_lease(worker: Worker, job_id: str, handed: Handed | None = None) -> None:
    """Hand an unfinished job back so its redelivery runs it at once instead of waiting
    out the lease, with what its attempt leaves the next one (`handed`). Shielded: it
    runs while the job is being cancelled."""
    with trio.move_on_after(FINISH_GRACE_S, shield=True):
        try:
            await worker.store.release_lease(job_id=job_id, lease_holder=worker.worker_id,
                                             handed=handed)
        except TransientError as exc:
            log.warning("job %s: lease not released (%s); it expires", job_id, exc)
