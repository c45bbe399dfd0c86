"""How a job ended, decided from facts alone: every terminal path of contract 6.2-4.4."""

from __future__ import annotations

from typing import Any

import pytest

from actors.errors import PermanentError, ProviderExhausted, Stalled, TransientError
from actors.job.outcome import cut_try_tokens, decide

NORMAL: dict[str, Any] = dict(cancel_requested=False, cancel_caught=False, timed_out=False,
                              timeout_s=60, finished=True, failure=None, text="an answer")


def outcome(**changes: Any):
    return decide(**{**NORMAL, **changes})


def test_a_finished_answer_completes():
    o = outcome()
    assert (o.status, o.error, o.partial) == ("completed", None, False)


def test_a_cancel_mid_stream_keeps_the_partial_answer_and_sends_no_error():
    o = outcome(cancel_requested=True, cancel_caught=True, finished=False, text="half")
    assert (o.status, o.error, o.partial) == ("cancelled", None, True)


def test_a_tombstone_cancel_before_the_start_is_cancelled_with_nothing_partial():
    o = outcome(cancel_requested=True, finished=False, text="")
    assert (o.status, o.partial) == ("cancelled", False)


def test_a_cancel_that_lands_after_the_answer_finished_changes_nothing():
    assert outcome(cancel_requested=True, cancel_caught=False).status == "completed"


def test_the_deadline_is_a_retryable_timeout_naming_the_limit():
    o = outcome(timed_out=True, finished=False, text="half", timeout_s=9)
    assert (o.status, o.partial) == ("timeout", True)
    assert o.error is not None and (o.error.code, o.error.retryable) == ("timeout", True)
    assert "9 s timeout" in o.error.message


def test_a_cancel_wins_over_the_deadline():
    o = outcome(cancel_requested=True, timed_out=True, finished=False)
    assert o.status == "cancelled"


def test_a_stalled_vendor_is_a_timeout_with_the_stall_code():
    failure = ProviderExhausted(Stalled("idle_timeout", 5), tries=3)
    o = outcome(finished=False, failure=failure, text="a")
    assert o.status == "timeout" and o.error is not None and o.error.code == "idle_timeout"
    assert o.partial


@pytest.mark.parametrize(("code", "retryable"), [("budget_exceeded", False),
                                                 ("rate_limited", True)])
def test_over_a_limit_the_job_is_rejected(code, retryable):
    o = outcome(finished=False, failure=PermanentError("over", code=code), text="")
    assert o.status == "rejected" and o.error is not None
    assert (o.error.code, o.error.retryable, o.partial) == (code, retryable, False)


def test_a_permanent_vendor_error_fails_for_good():
    o = outcome(finished=False, failure=PermanentError("401 bad key", code="auth"), text="")
    assert o.status == "failed" and o.error is not None
    assert (o.error.code, o.error.retryable) == ("auth", False)


def test_exhausted_retries_fail_as_retryable_provider_unavailable():
    failure = ProviderExhausted(TransientError("502"), tries=3)
    o = outcome(finished=False, failure=failure, text="some")
    assert o.status == "failed" and o.error is not None and o.partial
    assert (o.error.code, o.error.retryable) == ("provider_unavailable", True)


def test_error_messages_are_scrubbed_of_secrets():
    o = decide(**{**NORMAL, "finished": False, "scrub": lambda t: t.replace("sk-123", "[x]"),
                  "failure": PermanentError("bad key sk-123", code="auth")})
    assert o.error is not None and o.error.message == "bad key [x]"


def test_only_a_try_cut_off_mid_stream_is_left_to_bill():
    counted: list[str] = []

    def count(text: str) -> int:
        counted.append(text)
        return len(text.split())

    cut = dict(finished=False, tries=1, failure=None, text="a b c d e f g", billed_tokens=2,
               count=count)
    assert cut_try_tokens(**cut) == 5
    assert cut_try_tokens(**{**cut, "billed_tokens": 9}) == 0  # never negative
    assert cut_try_tokens(**{**cut, "finished": True}) is None  # the provider billed it
    assert cut_try_tokens(**{**cut, "tries": 0}) is None  # the model was never called
    assert cut_try_tokens(**{**cut, "failure": TransientError("x")}) is None
    assert len(counted) == 2  # a billed answer is never counted again
