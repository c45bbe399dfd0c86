"""finish: a job's terminal writes, in the order contract 6.1/6.2 needs.

`final` (or `error`) -> the job's row and messages committed in Postgres ->
`done` in Redis; only then may the intake commit the offset. Shielded: while the
worker runs, a job whose Postgres is away keeps its answer and waits for its
fenced terminal write (contract 6.11); once the worker stops, each job gets
FINISH_GRACE_S to settle, or raises TransientError with its offset uncommitted.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import trio

from actors.errors import TransientError
from actors.job.attempt import Answered
from actors.job.outcome import Outcome, cut_try_tokens
from actors.job.spend import Spend
from actors.job.takeover import earlier_usage
from actors.worker import Worker
from messages.mailboxes import CallMade, JobFinished, JobRef, PgSinkMessage, Receipt
from messages.ports import TokenCounts
from messages.wire import ChatRequest, Done, Error, Final, Usage

log = logging.getLogger("chat_actors.finish")


def attempt_spend(worker: Worker, answered: Answered) -> Spend:
    """This attempt's tries, and the try a cancel or timeout cut off mid-stream, which
    nobody billed: the vendor produced its tokens."""
    answer, count = answered.answer, answered.attempt.alias.count
    cut = cut_try_tokens(finished=answer.finished is not None, tries=answer.tries,
                         failure=answered.failure, text=answer.new_text,
                         billed_tokens=answer.spent.used.completion, count=count)
    if cut is None:
        return answer.spent
    return answer.spent.billed(worker.pricing, worker.aliases[answer.alias].spec, TokenCounts(
        prompt=answered.prompt_estimate + answer.carried_tokens, completion=cut))


def earlier_spend(worker: Worker, answered: Answered) -> Spend:
    """What the earlier attempts a takeover carries on from used."""
    plan, first = answered.attempt.plan, answered.attempt.alias
    earlier = Spend()
    if plan is None:
        return earlier
    if plan.handed_usage is not None:
        earlier = earlier.plus(plan.handed_usage, plan.handed_cost)
    for used in earlier_usage(plan, answered.prompt_estimate, first.count):
        earlier = earlier.billed(worker.pricing, first.spec, used)
    return earlier


def job_spend(worker: Worker, answered: Answered) -> Spend:
    """The job's usage and cost so far: this attempt's tries and the earlier attempts'."""
    spent, earlier = attempt_spend(worker, answered), earlier_spend(worker, answered)
    total = Spend().plus(spent.used, spent.cost_usd if answered.answer.tries else 0.0)
    return total.plus(earlier.used, earlier.cost_usd)


def terminal_record(request: ChatRequest, answered: Answered, outcome: Outcome, *,
                    spent: Spend, provider: str, user_tokens: int, started: float,
                    ended: float, receipt: Receipt) -> JobFinished:
    answer, job, prompt = answered.answer, answered.attempt.job, answered.prompt
    error = outcome.error
    first_token_at = answer.first_token_at
    used, cost_usd = spent.used, spent.cost_usd
    retrieved = prompt.retrieved if prompt is not None else None
    return JobFinished(
        job_id=job.job_id, user_id=job.user_id, session_id=job.session_id,
        status=outcome.status, attempt=job.attempt, model=answer.alias, provider=provider,
        prompt_tokens=used.prompt, completion_tokens=used.completion, cost_usd=cost_usd,
        ttft_ms=None if first_token_at is None else round((first_token_at - started) * 1000),
        latency_ms=round((ended - started) * 1000),
        error=None if error is None else f"{error.code}: {error.message}",
        partial=outcome.partial, user_message=request.message, user_tokens=user_tokens,
        answer=answer.text, messages=request.stored,  # v3 `store: false`: no rows
        retrieval_ms=retrieved.elapsed_ms if retrieved else None,
        retrieval_hits=len(answered.sources_used) if retrieved else None,
        retries=answer.retries, fallbacks=answer.fallbacks,
        reserved=answered.reservation.held,
        cached_tokens=used.cached, cache_write_tokens=used.cache_write,
        reasoning_tokens=used.reasoning, images=list(answered.images),
        # A refused job answered nothing; only a completed answer's calls are kept, so a
        # cancelled or cut answer never leaves a call without its results.
        tool_results=[] if outcome.status == "rejected" else [
            (r.tool_call_id, r.content) for r in request.tool_results or ()],
        tool_calls=[CallMade(c.id, c.name, c.arguments) for c in answer.tool_calls]
        if outcome.status == "completed" else [],
        thinking_blocks=list(answer.thinking_blocks)
        if outcome.status == "completed" and answer.tool_calls else [],
        receipt=receipt)


class Finished(NamedTuple):
    """A job's terminal records, written: what its metrics and log line are made of."""

    record: JobFinished
    outcome: Outcome  # as written (`failed` when only the minimal row could be)
    ttft_s: float | None
    latency_s: float


async def finish(request: ChatRequest, worker: Worker, answered: Answered, outcome: Outcome,
                 *, started: float) -> Finished | None:
    """`final` (or `error`), the row, `done`; None when a later attempt holds the job."""
    answer, job = answered.answer, answered.attempt.job
    provider = worker.aliases[answer.alias].provider  # the alias that answered
    count = answered.attempt.alias.count
    ended = trio.current_time()
    record = terminal_record(request, answered, outcome, spent=job_spend(worker, answered),
                             provider=provider, user_tokens=count(request.message),
                             started=started, ended=ended, receipt=Receipt())
    with worker.finishing.scope() as finishing:
        if outcome.status == "completed" and answer.finished is not None:
            await worker.emit(job, _final(record, answered, provider), wait=True)
        elif outcome.error is not None:
            await worker.emit(job, outcome.error, wait=True)
        # `final` (or `error`) is in Redis before the row is terminal: a redelivery that
        # finds the row terminal and writes a `done` the worker has not (yet) written
        # puts it after them, never at their seq (where Redis would then skip them).
        await worker.records.send(record)
        assert record.receipt is not None
        refused = await record.receipt.wait()
        if record.receipt.superseded:  # a later attempt holds the job: it alone ends it
            superseded(worker, job)
            return None
        if refused is not None:  # only the minimal row (failed, no content) was written
            worker.metrics.internal_errors.labels(where="record").inc()
            error = Error(code="internal", retryable=False,
                          message="the job's record could not be stored; it is kept as failed")
            outcome = Outcome(status="failed", partial=False, error=error)
            await worker.emit(job, error)
        await worker.emit(job, Done(status=outcome.status, partial=outcome.partial), wait=True)
    if finishing.cancelled_caught:
        raise TransientError(f"job {job.job_id}: terminal records not persisted before the "
                             "worker stopped")
    ttft_s = None if answer.first_token_at is None else answer.first_token_at - started
    return Finished(record, outcome, ttft_s=ttft_s, latency_s=ended - started)


def _final(record: JobFinished, answered: Answered, provider: str) -> Final:
    answer = answered.answer
    assert answer.finished is not None
    return Final(
        text=record.answer, finish_reason=answer.finished.finish_reason,
        usage=Usage(prompt_tokens=record.prompt_tokens,
                    completion_tokens=record.completion_tokens,
                    total_tokens=record.prompt_tokens + record.completion_tokens,
                    cached_tokens=record.cached_tokens,
                    cache_write_tokens=record.cache_write_tokens,
                    reasoning_tokens=record.reasoning_tokens),
        cost_usd=record.cost_usd, model=answer.alias, sources=answered.sources_used,
        provider=provider, retries=answer.retries, fallbacks=answer.fallbacks,
        nul_removed=answer.nul_removed, tool_calls=list(answer.tool_calls))


def superseded(worker: Worker, job: JobRef) -> None:
    """This attempt lost the job to a later one (its lease ran out meanwhile): it says
    nothing more, no `done`; the later attempt ends the job (contract 6.11)."""
    log.warning("job %s: attempt %d was superseded by a later attempt; it ends silently",
                job.job_id, job.attempt)
    worker.metrics.superseded.inc()


def failed_record(answered: Answered, spent: Spend, why: str, *,
                  latency_ms: int) -> JobFinished:
    """The minimal row of a job that failed outside its answer: `failed`, no content,
    but what it was billed and its budget reservation to settle."""
    answer, job = answered.answer, answered.attempt.job
    used = spent.used
    return JobFinished(
        job_id=job.job_id, user_id=job.user_id, session_id=job.session_id, status="failed",
        attempt=job.attempt, model=answer.alias, provider="", prompt_tokens=used.prompt,
        completion_tokens=used.completion, cost_usd=spent.cost_usd, ttft_ms=None,
        cached_tokens=used.cached, cache_write_tokens=used.cache_write,
        reasoning_tokens=used.reasoning,
        latency_ms=latency_ms, error=f"internal: {why}", partial=False, user_message="",
        user_tokens=0, answer="", messages=False, retries=answer.retries,
        fallbacks=answer.fallbacks, reserved=answered.reservation.held, receipt=Receipt())


async def settle_failed(worker: Worker, job: JobRef, record: PgSinkMessage, error: Error) -> None:
    """A job that failed outside its answer still settles: its minimal row, then
    `error` + `done{failed}`; raises TransientError if the worker stops first."""
    with worker.finishing.scope() as finishing:
        await worker.records.send(record)
        assert record.receipt is not None
        await record.receipt.wait()
        if record.receipt.superseded:
            superseded(worker, job)
            return
        await worker.emit(job, error)
        await worker.emit(job, Done(status="failed", partial=False), wait=True)
    if finishing.cancelled_caught:
        raise TransientError(f"job {job.job_id}: its failure was not persisted before the "
                             "worker stopped")


def observe(worker: Worker, mode: str, finished: Finished) -> None:
    """The settled job's metrics and its one log line."""
    metrics, (record, outcome, ttft_s, latency_s) = worker.metrics, finished
    model = record.model
    metrics.jobs.labels(status=outcome.status, mode=mode).inc()
    metrics.tokens.labels(direction="prompt", model=model).inc(record.prompt_tokens)
    metrics.tokens.labels(direction="completion", model=model).inc(record.completion_tokens)
    if record.cost_usd:
        metrics.cost.labels(model=model).inc(record.cost_usd)
    if ttft_s is not None:
        metrics.ttft.labels(model=model).observe(ttft_s)
    metrics.latency.labels(model=model).observe(latency_s)
    if outcome.status == "rejected" and outcome.error is not None:
        metrics.rejections.labels(reason=outcome.error.code).inc()
    cost = "?" if record.cost_usd is None else f"{record.cost_usd:.6f}"
    log.log(logging.INFO if outcome.error is None else logging.WARNING,
            "job %s %s in %.0f ms (%d+%d tokens, $%s, %d retries, %d fallbacks)%s",
            record.job_id, outcome.status, latency_s * 1000, record.prompt_tokens,
            record.completion_tokens, cost, record.retries, record.fallbacks,
            "" if outcome.error is None else f": {outcome.error.code}: {outcome.error.message}")
