"""OpenTelemetry behind the telemetry port: one trace per job in the GenAI semantic
conventions, the GenAI client metrics, both over OTLP/HTTP.

A job's spans are made when it ends, from the times it noted as it ran (messages/
telemetry.py), so a job costs nothing extra while it streams, and nothing at all when
telemetry is off (this module is then not even imported). The trace:

    process <request topic>       CONSUMER  child of the request's traceparent
    ├── claim
    ├── retrieval                 (RAG mode)
    ├── chat <model>              CLIENT    gen_ai.* attributes; all tries, one span, each
    │                                       try (a retry, a fallback) an event `try`
    └── sinks                     the job's terminal writes (Postgres, `final`, `done`)

`gen_ai.*` attributes appear only on the model-call span. Prompts and answers only
with otel.capture_content, and then at most CAPTURED_CHARS characters of text in each
attribute, a marker saying how many more there were: a prompt may be megabytes, and
a collector drops a span that large. The gateway's `send <topic>` PRODUCER span is
the job trace's parent: its traceparent travels as a Kafka header.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Span, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from config import Otel
from messages.telemetry import JobTelemetry, ModelCall

# LiteLLM's provider names where the GenAI conventions spell them otherwise.
PROVIDERS = {"gemini": "gcp.gemini", "vertex_ai": "gcp.vertex_ai", "bedrock": "aws.bedrock",
             "azure": "azure.ai.openai", "azure_ai": "azure.ai.inference",
             "mistral": "mistral_ai", "xai": "x_ai", "watsonx": "ibm.watsonx.ai"}
# Bucket boundaries the GenAI conventions advise for these histograms.
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864]
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92]
FIRST_CHUNK_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                       2.5, 5.0, 7.5, 10.0]
SPAN_QUEUE = 16384  # spans waiting to be sent; more are dropped (and counted by the SDK's log)
CAPTURED_CHARS = 16384  # of text in one captured attribute (prompt, system, answer)
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_PROPAGATOR = TraceContextTextMapPropagator()


class _JobIds(RandomIdGenerator):
    """Random ids, except that a job without a traceparent gets the trace id its logs
    already carry (set just before its root span starts)."""

    def __init__(self) -> None:
        self.next_trace_id: int | None = None

    def generate_trace_id(self) -> int:
        forced, self.next_trace_id = self.next_trace_id, None
        return forced or super().generate_trace_id()


class OtelTelemetry:
    """Spans and metrics for the worker (`job_ended`) and the gateway (`sending`).

    By default both go over OTLP/HTTP to `<otel.endpoint>/v1/traces` and `/v1/metrics`
    (spans batched in the SDK's thread); tests pass an in-memory exporter and reader."""

    enabled = True

    def __init__(self, otel: Otel, *, service: str, span_exporter: SpanExporter | None = None,
                 metric_reader: MetricReader | None = None) -> None:
        self.capture_content = otel.capture_content
        self._closed = False
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME")
                                    or service})
        self._ids = _JobIds()
        self._traces = TracerProvider(resource=resource, id_generator=self._ids)
        base = otel.endpoint.rstrip("/")
        if span_exporter is None:
            # A worker ends hundreds of jobs a second, four spans each: the SDK's default
            # queue (2,048 spans, sent every 5 s) would drop spans in a burst.
            self._traces.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=f"{base}/v1/traces", timeout=10),
                max_queue_size=SPAN_QUEUE, schedule_delay_millis=1000,
                max_export_batch_size=1024))
        else:
            self._traces.add_span_processor(SimpleSpanProcessor(span_exporter))
        reader = metric_reader or PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{base}/v1/metrics", timeout=10),
            export_interval_millis=otel.export_interval_s * 1000)
        self._meters = MeterProvider(resource=resource, metric_readers=[reader])
        self._tracer = self._traces.get_tracer("chat-actors")
        meter = self._meters.get_meter("chat-actors")
        self._token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self._first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s",
            description="Time to receive the first chunk in a streaming operation.",
            explicit_bucket_boundaries_advisory=FIRST_CHUNK_BUCKETS)

    # ------------------------------------------------------------------ the worker

    def job_ended(self, record: JobTelemetry) -> None:
        parent = _PROPAGATOR.extract({"traceparent": record.parent}) if record.parent else None
        if parent is None and _HEX32.match(record.trace_id) and int(record.trace_id, 16):
            self._ids.next_trace_id = int(record.trace_id, 16)
        root = self._tracer.start_span(
            f"process {record.topic}", context=parent, kind=SpanKind.CONSUMER,
            start_time=record.start_ns, attributes={
                "messaging.system": "kafka", "messaging.operation.type": "process",
                "messaging.destination.name": record.topic,
                "chat_actors.job_id": record.job_id, "chat_actors.attempt": record.attempt,
                "chat_actors.status": record.status})
        self._ids.next_trace_id = None
        _failed(root, record.error_type)
        inside = trace.set_span_in_context(root)
        for step in record.steps:
            span = self._tracer.start_span(step.name, context=inside, start_time=step.start_ns)
            _failed(span, step.error_type)
            span.end(end_time=step.end_ns)
        if record.model_call is not None:
            self._model_call(record.model_call, record, inside)
        root.end(end_time=record.end_ns)

    def _model_call(self, call: ModelCall, record: JobTelemetry, parent: Any) -> None:
        provider = PROVIDERS.get(call.provider, call.provider)
        model = call.model.split("/", 1)[1] if call.model.startswith(f"{call.provider}/") \
            else call.model
        common: dict[str, Any] = {"gen_ai.operation.name": "chat",
                                  "gen_ai.provider.name": provider,
                                  "gen_ai.request.model": model}
        if call.response_model:
            common["gen_ai.response.model"] = call.response_model
        attributes: dict[str, Any] = {
            **common, "gen_ai.conversation.id": record.session_id,
            "gen_ai.request.stream": True,
            "gen_ai.usage.input_tokens": call.input_tokens,
            "gen_ai.usage.output_tokens": call.output_tokens}
        for name, count in (("cache_read.input_tokens", call.cache_read_tokens),
                            ("cache_creation.input_tokens", call.cache_creation_tokens),
                            ("reasoning.output_tokens", call.reasoning_tokens)):
            if count:  # the parts a vendor reported: absent means none
                attributes[f"gen_ai.usage.{name}"] = count
        for name, value in call.params.items():
            key = "stop_sequences" if name == "stop" else name
            attributes[f"gen_ai.request.{key}"] = [value] if isinstance(value, str) else value
        if call.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = call.finish_reasons
        if call.first_chunk_ns is not None:
            attributes["gen_ai.response.time_to_first_chunk"] = (
                (call.first_chunk_ns - call.start_ns) / 1e9)
        if call.input_messages is not None:
            system, messages = _input_messages(call.input_messages)
            attributes["gen_ai.input.messages"] = json.dumps(messages, ensure_ascii=False)
            if system:
                attributes["gen_ai.system_instructions"] = json.dumps(system, ensure_ascii=False)
        if call.output_text is not None:
            attributes["gen_ai.output.messages"] = json.dumps([{
                "role": "assistant",
                "parts": [{"type": "text", "content": _Captured().text(call.output_text)}],
                "finish_reason": call.finish_reasons[0] if call.finish_reasons else "error"}],
                ensure_ascii=False)
        span = self._tracer.start_span(f"chat {model}", context=parent, kind=SpanKind.CLIENT,
                                       start_time=call.start_ns, attributes=attributes)
        _failed(span, call.error_type)
        for n, one in enumerate(call.tries, 1):  # an event at each try's end
            span.add_event("try", timestamp=one.end_ns, attributes={
                "chat_actors.try": n, "chat_actors.alias": one.name,
                "chat_actors.model": one.model,
                "chat_actors.duration_s": (one.end_ns - one.start_ns) / 1e9,
                **({"error.type": one.error_type} if one.error_type else {})})
        span.end(end_time=call.end_ns)
        measured = {**common, **({"error.type": call.error_type} if call.error_type else {})}
        self._duration.record((call.end_ns - call.start_ns) / 1e9, measured)
        if call.first_chunk_ns is not None:
            self._first_chunk.record((call.first_chunk_ns - call.start_ns) / 1e9, common)
        if call.input_tokens or call.output_tokens:
            self._token_usage.record(call.input_tokens, {**common, "gen_ai.token.type": "input"})
            self._token_usage.record(call.output_tokens,
                                     {**common, "gen_ai.token.type": "output"})

    # ----------------------------------------------------------------- the gateway

    @contextmanager
    def sending(self, topic: str, incoming: str | None) -> Generator[str | None]:
        """A PRODUCER span for one request put on `topic`, continuing the client's
        `traceparent` when it sent one; yields the traceparent the message carries."""
        parent = _PROPAGATOR.extract({"traceparent": incoming}) if incoming else None
        span = self._tracer.start_span(
            f"send {topic}", context=parent, kind=SpanKind.PRODUCER, attributes={
                "messaging.system": "kafka", "messaging.operation.type": "send",
                "messaging.destination.name": topic})
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        try:
            yield carrier.get("traceparent")
        except BaseException as exc:
            _failed(span, type(exc).__qualname__)
            raise
        finally:
            span.end()

    def close(self) -> None:
        """Send what is still buffered, then stop the exporters' threads (once)."""
        if not self._closed:
            self._closed = True
            self._traces.shutdown()
            self._meters.shutdown()


def _failed(span: Span | Any, error_type: str | None) -> None:
    if error_type:
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR))


class _Captured:
    """What is left of one attribute's CAPTURED_CHARS, spent part by part in order."""

    def __init__(self) -> None:
        self.left = CAPTURED_CHARS

    def text(self, text: str) -> str:
        kept = text[:max(self.left, 0)]
        self.left -= len(text)
        cut = len(text) - len(kept)
        return f"{kept}…[{cut} more characters not captured]" if cut else text


def _input_messages(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                                 list[dict[str, Any]]]:
    """Chat messages in the conventions' form: the system parts apart, every other
    message as role and parts (an image by its URL; a data URL's bytes are left out).
    The text of each of the two is kept within CAPTURED_CHARS, the newest first."""
    system_budget, budget = _Captured(), _Captured()
    system: list[dict[str, Any]] = []
    found: list[dict[str, Any]] = []
    for message in reversed(messages):
        content = message.get("content")
        items: list[Any] = content if isinstance(content, list) else [content]
        parts: list[dict[str, Any]] = []
        spend = system_budget if message.get("role") == "system" else budget
        for item in items:
            if isinstance(item, str):
                parts.append({"type": "text", "content": spend.text(item)})
            elif isinstance(item, dict) and item.get("type") == "text":
                parts.append({"type": "text", "content": spend.text(str(item.get("text", "")))})
            elif isinstance(item, dict) and item.get("type") == "image_url":
                url = str((item.get("image_url") or {}).get("url", ""))
                parts.append({"type": "uri", "modality": "image",
                              "uri": url if not url.startswith("data:") else
                              url.split(",", 1)[0] + ",(left out)"})
        if message.get("role") == "system":
            system[:0] = parts
        else:
            found.append({"role": message.get("role"), "parts": parts})
    return system, found[::-1]
