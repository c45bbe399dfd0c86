"""What one job tells the telemetry port when it ends: its steps and its model call,
each with wall-clock times (nanoseconds since the epoch), from which the adapter makes
the job's trace and the GenAI metrics. Recorded as the job runs at the cost of a few
clock reads; turned into spans only when telemetry is on."""

from __future__ import annotations

from typing import Any

import msgspec


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """A timed step of a job (claim, retrieval, sinks)."""

    name: str
    start_ns: int
    end_ns: int
    error_type: str | None = None


class ModelTry(Step, frozen=True, kw_only=True):
    """One request to a vendor (the first, a retry, or a fallback's), named by its alias;
    no error_type: it finished the answer."""

    model: str


class ModelCall(msgspec.Struct, frozen=True, kw_only=True):
    """The whole model call of a job, across its retries and fallbacks."""

    alias: str  # the alias the job asked for
    model: str  # its LiteLLM model string
    provider: str  # LiteLLM's name for the vendor (openai, anthropic, ...)
    params: dict[str, Any]  # what was sent: max_tokens, temperature, ...
    start_ns: int
    end_ns: int
    tries: list[ModelTry]
    first_chunk_ns: int | None = None
    response_model: str | None = None  # what the vendor says answered
    finish_reasons: list[str] = msgspec.field(default_factory=list[str])
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    error_type: str | None = None  # cancelled, timeout, or the error's code
    # Only with otel.capture_content: the prompt (chat messages) and the answer.
    input_messages: list[dict[str, Any]] | None = None
    output_text: str | None = None


class JobTelemetry(msgspec.Struct, frozen=True, kw_only=True):
    """One job's run on this worker, from intake to its terminal writes."""

    job_id: str
    session_id: str
    attempt: int
    topic: str
    parent: str | None  # the request's W3C traceparent, when it carried a valid one
    trace_id: str  # the job's trace id in the logs (the trace's own, when it is 32 hex)
    start_ns: int
    end_ns: int
    status: str  # the job's done status, or "settled" when it did not run here
    steps: list[Step]
    model_call: ModelCall | None = None
    error_type: str | None = None
