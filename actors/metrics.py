"""metrics: what the worker counts, served as Prometheus text on /metrics.

One registry per worker (tests run several workers in one process). Every
metric is documented in README "Operations"; names follow Prometheus
conventions (counters end in _total, durations are seconds).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from actors.errors import PermanentError, TransientError

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.jobs = Counter(
            "chat_actors_jobs", "Jobs settled, by final status and mode.",
            ["status", "mode"], registry=registry)
        self.tokens = Counter(
            "chat_actors_tokens", "Tokens billed: direction is prompt (in) or completion (out).",
            ["direction", "model"], registry=registry)
        self.cost = Counter(
            "chat_actors_cost_usd", "Cost of settled jobs in USD, by model alias.",
            ["model"], registry=registry)
        self.ttft = Histogram(
            "chat_actors_ttft_seconds", "Job start to first token, by model alias.",
            ["model"], buckets=TTFT_BUCKETS, registry=registry)
        self.latency = Histogram(
            "chat_actors_job_latency_seconds", "Job start to settled, by model alias.",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge(
            "chat_actors_jobs_in_flight", "Jobs admitted and not yet settled.", registry=registry)
        self.lag = Gauge(
            "chat_actors_consumer_lag", "Requests not yet consumed, per assigned partition.",
            ["topic", "partition"], registry=registry)
        self.mailbox = Gauge(
            "chat_actors_mailbox_depth", "Messages waiting in an actor's mailbox.",
            ["mailbox"], registry=registry)
        self.provider_errors = Counter(
            "chat_actors_provider_errors", "Failed model calls, by vendor and kind.",
            ["vendor", "kind"], registry=registry)
        self.provider_retries = Counter(
            "chat_actors_provider_retries", "Model calls retried on the same alias, by vendor.",
            ["vendor"], registry=registry)
        self.provider_fallbacks = Counter(
            "chat_actors_provider_fallbacks", "Switches to a fallback alias, by vendor left and taken.",
            ["from_vendor", "to_vendor"], registry=registry)
        self.internal_errors = Counter(
            "chat_actors_internal_errors", "Jobs failed by a bug or an unexpected error (where: "
            "job, claim, finish; intake: left unsettled), or settled as failed because "
            "Postgres refused their record (where: record).",
            ["where"], registry=registry)
        self.superseded = Counter(
            "chat_actors_superseded_attempts", "Attempts that found, at their terminal write, "
            "that a later attempt holds the job: they wrote nothing and sent no done.",
            registry=registry)
        self.takeovers = Counter(
            "chat_actors_takeovers", "Jobs taken over from an earlier attempt (contract 3.3): "
            "result resumed (the answer continues), else why it starts over.",
            ["result"], registry=registry)
        self.restarts = Counter(
            "chat_actors_restarts", "Answers started over as a new attempt inside the worker "
            "(a retry or fallback that could not continue them), by restarts.reason.",
            ["reason"], registry=registry)
        self.prefill_refused = Counter(
            "chat_actors_prefill_refused", "Aliases whose vendor refused an assistant prefill "
            "though their config or the model map said it continues (once per alias and "
            "process; its answers start over from then on).",
            ["alias", "vendor"], registry=registry)
        self.fenced_calls = Counter(
            "chat_actors_fenced_model_calls", "Model calls not made because the job's fence "
            "said a later attempt holds it or it has ended.", registry=registry)
        self.longest_step = Gauge(
            "chat_actors_longest_step_seconds", "The longest a task ran between two checkpoints "
            "since start (the event loop was stalled that long), and which task.",
            ["task"], registry=registry)
        self.slow_steps = Counter(
            "chat_actors_slow_steps", "Task steps that ran over 100 ms without a checkpoint.",
            registry=registry)
        self.tombstones = Gauge(
            "chat_actors_cancel_tombstones", "Cancels kept for jobs not running here yet.",
            registry=registry)
        self.tombstones_evicted = Counter(
            "chat_actors_cancel_tombstones_evicted", "Cancels dropped before their TTL: their "
            "user (or all users) had too many waiting.", registry=registry)
        self.rejections = Counter(
            "chat_actors_rejections", "Requests refused before any model call, by reason.",
            ["reason"], registry=registry)

    def watch_mailbox(self, name: str, depth: Callable[[], int]) -> None:
        self.mailbox.labels(mailbox=name).set_function(depth)

    def provider_failed(self, vendor: str, error: TransientError | PermanentError) -> None:
        self.provider_errors.labels(vendor=vendor, kind=error_kind(error)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def error_kind(error: TransientError | PermanentError) -> str:
    """A short, bounded label for a failure (never its message: labels must not explode)."""
    if isinstance(error, PermanentError):
        return error.code
    return error.kind
