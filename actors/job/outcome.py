"""outcome: how a job ended, decided from facts alone (no I/O, no clock).

One place answers "which terminal status, which error, is the answer partial,
and is a try left unbilled", so every path (a cancel, a timeout, a stall, a
refusal, a vendor failure) reads the same and is unit-tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from actors.errors import (
    LimitReached,
    PermanentError,
    ProviderExhausted,
    RequestRefused,
    Stalled,
    TransientError,
)
from actors.job.budget import REFUSALS
from messages.wire import DoneStatus, Error


@dataclass(frozen=True)
class Outcome:
    status: DoneStatus
    error: Error | None  # sent before `done` (a cancel sends none: the user asked for it)
    partial: bool  # an answer was streamed, and the job did not complete


def decide(*, cancel_requested: bool, cancel_caught: bool, timed_out: bool, timeout_s: float,
           finished: bool, failure: TransientError | PermanentError | None, text: str,
           scrub: Callable[[str], str] = str) -> Outcome:
    """`cancel_requested`: the job's user cancelled it (even before it started);
    `cancel_caught`: that cancel interrupted the job; `timed_out`: the job's deadline
    did; `finished`: the model finished its answer; `failure`: what ended the job early."""
    status, error = _status(cancel_requested=cancel_requested, cancel_caught=cancel_caught,
                            timed_out=timed_out, timeout_s=timeout_s, finished=finished,
                            failure=failure, scrub=scrub)
    return Outcome(status=status, error=error, partial=status != "completed" and bool(text))


def _status(*, cancel_requested: bool, cancel_caught: bool, timed_out: bool, timeout_s: float,
            finished: bool, failure: TransientError | PermanentError | None,
            scrub: Callable[[str], str]) -> tuple[DoneStatus, Error | None]:
    if cancel_requested and (cancel_caught or not finished):
        return "cancelled", None
    if timed_out:
        return "timeout", Error(code="timeout", retryable=True,
                                message=f"the job took longer than its {timeout_s:g} s timeout")
    match failure:
        case None:
            return "completed", None
        case ProviderExhausted(last=Stalled() as stall):
            return "timeout", Error(code=stall.code, retryable=True, message=scrub(str(failure)))
        case RequestRefused(code=code):
            return "rejected", Error(code=code, message=scrub(str(failure)), retryable=False)
        case PermanentError(code=code) if code in REFUSALS:
            # Over a budget or rate limit: no model call was made.
            return "rejected", Error(code=code, message=scrub(str(failure)),
                                     retryable=code == "rate_limited",
                                     retry_after_s=failure.retry_after_s
                                     if isinstance(failure, LimitReached) else None)
        case PermanentError(code=code):
            return "failed", Error(code=code, message=scrub(str(failure)), retryable=False)
        case TransientError():
            code = failure.code if isinstance(failure, Stalled) else "provider_unavailable"
            return "failed", Error(code=code, message=scrub(str(failure)), retryable=True)


def cut_try_tokens(*, finished: bool, tries: int,
                   failure: TransientError | PermanentError | None, text: str,
                   billed_tokens: int, count: Callable[[str], int]) -> int | None:
    """A try cut off mid-stream by a cancel or timeout was billed by nobody: the
    completion tokens to bill it for (the vendor produced them), or None when every
    try was billed (the provider bills each try that ends, failed or not). `text` is
    counted only then: a finished job never pays for counting its answer again."""
    if finished or not tries or failure is not None:
        return None
    return max(count(text) - billed_tokens, 0)
