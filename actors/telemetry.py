"""What a job records for its trace as it runs, and the port's no-op when telemetry is off.

A job notes the Trio time at each step's start and end (claim, retrieval, the model
call and its tries, the terminal writes); when it ends, and only when telemetry is
on, those become one JobTelemetry with wall-clock times for the adapter to turn into
spans and metrics. Off, the cost is a handful of clock reads per job.
"""

from __future__ import annotations

import re
import time
from collections.abc import Generator, Iterable
from contextlib import contextmanager

import trio

from actors.errors import PermanentError, TransientError
from messages.telemetry import JobTelemetry, Step

# W3C trace context: a version (ff is invalid), a trace id and a parent id that are not
# all zeros, the flags; a later version may add fields after them.
_TRACEPARENT = re.compile(r"^(?!ff)([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})"
                          r"(-[^\s]*)?$")


def traceparent_of(headers: Iterable[tuple[str, bytes]]) -> str | None:
    """The request's `traceparent` header when it is a valid W3C one (anything else is
    ignored, as the W3C spec asks: the job then starts a trace of its own)."""
    for name, value in headers:
        if name.lower() == "traceparent":
            text = value.decode("ascii", "replace").strip().lower()
            match = _TRACEPARENT.match(text)
            if (match and match.group(2) != "0" * 32 and match.group(3) != "0" * 16
                    and not (match.group(1) == "00" and match.group(5))):
                return "-".join(match.group(1, 2, 3, 4))
            return None
    return None


def error_type(exc: BaseException) -> str:
    """The `error.type` of what ended a step: our error's code or kind, `cancelled`
    for a cancel, else the exception's class."""
    if isinstance(exc, trio.Cancelled):
        return "cancelled"
    if isinstance(exc, PermanentError):
        return exc.code
    if isinstance(exc, TransientError):
        return exc.kind or "transient"
    return type(exc).__qualname__


class Timeline:
    """One job's clock: Trio times noted as it runs, wall-clock times at the end."""

    def __init__(self) -> None:
        self._trio = trio.current_time()
        self._wall_ns = time.time_ns()
        self.steps: list[Step] = []

    def ns(self, at: float) -> int:
        """A Trio time as nanoseconds since the epoch."""
        return self._wall_ns + round((at - self._trio) * 1e9)

    @property
    def start_ns(self) -> int:
        return self._wall_ns

    @contextmanager
    def step(self, name: str) -> Generator[None]:
        started = trio.current_time()
        failed: str | None = None
        try:
            yield
        except BaseException as exc:
            failed = error_type(exc)
            raise
        finally:
            self.steps.append(Step(name=name, start_ns=self.ns(started),
                                   end_ns=self.ns(trio.current_time()), error_type=failed))


class NoTelemetry:
    """Telemetry off: nothing is built or sent."""

    enabled = False
    capture_content = False

    def job_ended(self, record: JobTelemetry) -> None:
        pass

    @contextmanager
    def sending(self, topic: str, incoming: str | None) -> Generator[str | None]:
        yield incoming  # a client's trace still reaches the worker's logs

    def close(self) -> None:
        pass
