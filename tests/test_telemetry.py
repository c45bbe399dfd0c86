"""OpenTelemetry: one trace per job in the GenAI conventions, the GenAI metrics, and
OTLP/HTTP export, with the SDK's in-memory exporter and a real OTLP/HTTP receiver on
loopback. The worker and the gateway run for real; only the vendor is scripted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from actors.adapters.telemetry import OtelTelemetry
from actors.telemetry import traceparent_of
from config import Otel
from tests.helpers import events_of, gateway_running, job_row, produce, request, worker_running
from tests.scripted_llm import Reply
from tests.test_gateway import bearer, read_events
from tools.otlp_collector import Collector

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class Recorded:
    """Telemetry whose spans and metrics stay in memory, for a test to read."""

    def __init__(self, capture_content: bool = False) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        self.telemetry = OtelTelemetry(Otel(capture_content=capture_content), service="test",
                                       span_exporter=self.spans, metric_reader=self.metrics)

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        return [(dict(point.attributes or {}), point)
                for resource in data.resource_metrics for scope in resource.scope_metrics
                for metric in scope.metrics if metric.name == name
                for point in metric.data.data_points]


def by_name(spans: list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        found.setdefault(span.name, []).append(span)
    return found


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def job_trace(recorded: Recorded, job_id: str) -> list[ReadableSpan]:
    """The spans of the trace whose root is this job's."""
    (root,) = [s for s in recorded.finished()
               if (s.attributes or {}).get("chat_actors.job_id") == job_id]
    return [s for s in recorded.finished() if hex_trace(s) == hex_trace(root)]


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    kept = Recorded()
    yield kept
    kept.telemetry.close()


async def test_a_job_continues_the_producers_trace_with_one_model_call_span_across_retries(
        config, llm, rds, recorded):
    llm.queue(Reply(status=500), Reply(tokens=("Traced", " answer", "."), usage={
        "prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 4}}))
    req = request("Trace me", params={"temperature": 0.25, "maxTokens": 64})
    async with worker_running(config, telemetry=recorded.telemetry):
        produce(config, req, headers=[("traceparent",
                                       f"00-{PARENT_TRACE}-{PARENT_SPAN}-01".encode())])
        events = await events_of(rds, config, req["jobId"])
    assert events[-1]["data"]["status"] == "completed"
    spans = job_trace(recorded, req["jobId"])
    assert {hex_trace(s) for s in spans} == {PARENT_TRACE}  # one trace, the producer's
    named = by_name(spans)
    (root,) = named[f"process {config.kafka.request_topic}"]
    assert root.kind is SpanKind.CONSUMER
    assert root.parent is not None and f"{root.parent.span_id:016x}" == PARENT_SPAN
    (chat,) = named["chat scripted-model"]  # one span for both tries
    assert set(named) == {root.name, "claim", "chat scripted-model", "sinks"}
    for step in ("claim", "sinks", "chat scripted-model"):
        (span,) = named[step]
        assert span.parent is not None and span.parent.span_id == root.context.span_id
    assert chat.kind is SpanKind.CLIENT
    tries = [dict(e.attributes or {}) for e in chat.events if e.name == "try"]
    assert [(t["chat_actors.try"], t["chat_actors.alias"], t.get("error.type"))
            for t in tries] == [(1, "scripted", "server_error"), (2, "scripted", None)]
    attributes = dict(chat.attributes or {})
    assert {k: attributes.get(k) for k in (
        "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
        "gen_ai.request.temperature", "gen_ai.request.max_tokens", "gen_ai.conversation.id",
        "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
        "gen_ai.response.finish_reasons")} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "scripted-model", "gen_ai.request.temperature": 0.25,
        "gen_ai.request.max_tokens": 64, "gen_ai.conversation.id": req["sessionId"],
        "gen_ai.usage.input_tokens": 11, "gen_ai.usage.output_tokens": 3,
        "gen_ai.response.finish_reasons": ("stop",)}
    assert attributes["gen_ai.response.model"]
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 4  # of the 11
    assert "gen_ai.usage.reasoning.output_tokens" not in attributes  # none reported
    assert 0 <= attributes["gen_ai.response.time_to_first_chunk"] <= (
        (chat.end_time or 0) - (chat.start_time or 0)) / 1e9
    assert "error.type" not in attributes
    # gen_ai.* only on the GenAI span, and no content unless asked for.
    assert not [(s.name, k) for s in spans if s is not chat
                for k in (s.attributes or {}) if k.startswith("gen_ai.")]
    assert not {"gen_ai.input.messages", "gen_ai.output.messages",
                "gen_ai.system_instructions"} & attributes.keys()
    assert "Trace me" not in json.dumps([dict(s.attributes or {}) for s in spans])
    # The metrics, with the request's model and each token type.
    usage = {a["gen_ai.token.type"]: p.sum for a, p in recorded.points("gen_ai.client.token.usage")
             if a["gen_ai.request.model"] == "scripted-model"}
    assert usage == {"input": 11, "output": 3}
    (duration,) = recorded.points("gen_ai.client.operation.duration")
    assert duration[1].count == 1 and duration[0]["gen_ai.provider.name"] == "openai"
    assert recorded.points("gen_ai.client.operation.time_to_first_chunk")[0][1].count == 1


async def test_a_fallback_is_a_try_of_the_same_model_call_span(make_config, llm, rds, recorded):
    config, _ = make_config(environ={"CHAT_ACTORS__LLM__RETRIES": "0",
                                     "CHAT_ACTORS__LLM__MODELS__SCRIPTED__FALLBACKS": '["priced"]'})
    llm.queue(Reply(status=503), Reply(tokens=("Fell", " back")))
    req = request("Fall back")
    async with worker_running(config, telemetry=recorded.telemetry):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    assert events[-1]["data"]["status"] == "completed"
    (chat,) = [s for s in job_trace(recorded, req["jobId"]) if s.name.startswith("chat ")]
    assert chat.name == "chat scripted-model"  # the model the job asked for
    tries = [dict(e.attributes or {}) for e in chat.events if e.name == "try"]
    assert [(t["chat_actors.alias"], t["chat_actors.model"], t.get("error.type"))
            for t in tries] == [("scripted", "openai/scripted-model", "server_error"),
                                ("priced", "openai/gpt-4o-mini", None)]
    assert "error.type" not in (chat.attributes or {})


async def test_prompts_and_answers_are_on_the_span_only_when_capture_content_is_on(
        config, llm, rds):
    kept = Recorded(capture_content=True)
    llm.default = Reply(tokens=("Seen", "."))
    req = request("Show my words")
    try:
        async with worker_running(config, telemetry=kept.telemetry):
            produce(config, req)
            await events_of(rds, config, req["jobId"])
        (chat,) = [s for s in job_trace(kept, req["jobId"]) if s.name.startswith("chat ")]
    finally:
        kept.telemetry.close()
    attributes = dict(chat.attributes or {})
    asked = json.loads(attributes["gen_ai.input.messages"])
    assert asked[-1] == {"role": "user", "parts": [{"type": "text", "content": "Show my words"}]}
    assert json.loads(attributes["gen_ai.system_instructions"]) == [
        {"type": "text", "content": config.llm.system_prompt}]
    assert json.loads(attributes["gen_ai.output.messages"]) == [{
        "role": "assistant", "parts": [{"type": "text", "content": "Seen."}],
        "finish_reason": "stop"}]


async def test_captured_prompts_and_answers_are_cut_to_a_bounded_size_with_a_marker(
        make_config, llm, rds):
    """A 30,000-character question and answer: each attribute keeps CAPTURED_CHARS of
    text, says how much it left out, and is still JSON."""
    from actors.adapters.telemetry import CAPTURED_CHARS

    config, _ = make_config(environ={"CHAT_ACTORS__LLM__MODELS__SCRIPTED__CONTEXT_WINDOW":
                                     "100000"})
    kept = Recorded(capture_content=True)
    llm.default = Reply(tokens=tuple("a" * 999 + " " for _ in range(30)))
    req = request("word " * 6000)
    try:
        async with worker_running(config, telemetry=kept.telemetry):
            produce(config, req)
            events = await events_of(rds, config, req["jobId"])
        (chat,) = [s for s in job_trace(kept, req["jobId"]) if s.name.startswith("chat ")]
    finally:
        kept.telemetry.close()
    assert events[-1]["data"]["status"] == "completed"
    attributes = dict(chat.attributes or {})
    cut = f"…[{30_000 - CAPTURED_CHARS} more characters not captured]"
    (asked,) = json.loads(str(attributes["gen_ai.input.messages"]))
    assert asked["parts"][0]["content"] == ("word " * 6000)[:CAPTURED_CHARS] + cut
    (answered,) = json.loads(str(attributes["gen_ai.output.messages"]))
    assert answered["parts"][0]["content"] == ("a" * 999 + " ") * 16 + "a" * 384 + cut
    assert all(len(str(value)) < CAPTURED_CHARS + 1000 for value in attributes.values())


async def test_a_cancelled_and_a_timed_out_model_call_say_so_in_error_type(
        config, llm, rds, recorded):
    slow = Reply(tokens=tuple(f"t{n} " for n in range(200)), token_delay_s=0.05)
    llm.queue(slow, slow)
    cancelled, timed_out = request("Cancel me"), request("Time me out", timeoutS=1)
    async with worker_running(config, telemetry=recorded.telemetry):
        produce(config, cancelled, timed_out)
        await trio.to_thread.run_sync(lambda: llm.wait_until(
            lambda calls: sum(c.tokens_sent > 0 for c in calls) >= 2, 30))
        produce(config, {"type": "cancel", "jobId": cancelled["jobId"], "userId": "alice"},
                topic=config.kafka.control_topic)
        for req in (cancelled, timed_out):
            await events_of(rds, config, req["jobId"])
    for req, status in ((cancelled, "cancelled"), (timed_out, "timeout")):
        named = by_name(job_trace(recorded, req["jobId"]))
        (chat,) = named["chat scripted-model"]
        (root,) = named[f"process {config.kafka.request_topic}"]
        (one_try,) = [dict(e.attributes or {}) for e in chat.events if e.name == "try"]
        assert one_try.get("error.type") == status
        for span in (chat, root):
            assert (span.attributes or {}).get("error.type") == status, span.name
    errors = {a.get("error.type") for a, _ in recorded.points("gen_ai.client.operation.duration")}
    assert errors == {"cancelled", "timeout"}


async def test_a_job_without_a_traceparent_traces_under_the_id_its_logs_and_row_carry(
        config, llm, rds, db, recorded):
    llm.default = Reply(tokens=("Own", " trace"))
    req = request("No parent")
    async with worker_running(config, telemetry=recorded.telemetry):
        produce(config, req, headers=[("traceparent", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01")])
        await events_of(rds, config, req["jobId"])
    spans = job_trace(recorded, req["jobId"])
    (root,) = [s for s in spans if s.parent is None]  # an invalid header starts a new trace
    row = job_row(db, req["jobId"])
    assert row is not None and hex_trace(root) == row["trace_id"]


async def test_one_trace_runs_from_the_client_through_the_gateway_to_the_model_call(
        gw_config, llm, recorded):
    config = gw_config()
    llm.default = Reply(tokens=("Through", " it", " all"))
    browser = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
    async with worker_running(config, telemetry=recorded.telemetry), \
            gateway_running(config, telemetry=recorded.telemetry) as (_, http):
        accepted = await http.post("/v1/chat", headers=bearer() | {"traceparent": browser},
                                   json={"sessionId": "s-otel", "message": "Hi"})
        job_id = accepted.json()["jobId"]
        assert (await read_events(http, job_id))[0] == 200
        # A hostile header is ignored: that job starts a trace of its own.
        odd = await http.post("/v1/chat", headers=bearer() | {"traceparent": b"00-zz\xe9"},
                              json={"sessionId": "s-otel-2", "message": "Hi"})
        assert odd.status_code == 202
        assert (await read_events(http, odd.json()["jobId"]))[0] == 200
    spans = job_trace(recorded, job_id)
    named = by_name(spans)
    (send,) = named[f"send {config.kafka.request_topic}"]
    (root,) = named[f"process {config.kafka.request_topic}"]
    assert send.kind is SpanKind.PRODUCER and hex_trace(send) == PARENT_TRACE
    assert send.parent is not None and f"{send.parent.span_id:016x}" == PARENT_SPAN
    assert root.parent is not None and root.parent.span_id == send.context.span_id
    assert "chat scripted-model" in named
    other = job_trace(recorded, odd.json()["jobId"])
    assert {hex_trace(s) for s in other} != {PARENT_TRACE}


@pytest.mark.parametrize(("value", "kept"), [
    (f"00-{PARENT_TRACE}-{PARENT_SPAN}-01", True),
    (f"  00-{PARENT_TRACE.upper()}-{PARENT_SPAN}-01 ", True),  # case and spaces
    (f"01-{PARENT_TRACE}-{PARENT_SPAN}-01-future-field", True),  # a later version
    (f"00-{PARENT_TRACE}-{PARENT_SPAN}-01-extra", False),  # version 00 has no more fields
    (f"ff-{PARENT_TRACE}-{PARENT_SPAN}-01", False),
    (f"00-{'0' * 32}-{PARENT_SPAN}-01", False),
    (f"00-{PARENT_TRACE}-{'0' * 16}-01", False),
    (f"00-{PARENT_TRACE[:-1]}-{PARENT_SPAN}-01", False),
    ("", False), ("\x00\xff garbage", False),
])
def test_only_a_valid_w3c_traceparent_is_continued(value, kept):
    found = traceparent_of([("TraceParent", value.encode("latin-1"))])
    assert (found is not None) is kept
    if kept:
        assert found is not None and found.split("-")[1] == PARENT_TRACE


async def test_spans_and_metrics_reach_a_real_otlp_http_collector(make_config, llm, rds):
    llm.default = Reply(tokens=("Exported", "."))
    with Collector() as collector:
        config, _ = make_config(environ={"CHAT_ACTORS__OTEL__ENDPOINT": collector.url})
        req = request("Export me")
        async with worker_running(config):  # telemetry from the config: OTLP/HTTP
            produce(config, req)
            await events_of(rds, config, req["jobId"])
        # The worker flushed both on its way out.
    traces = [ExportTraceServiceRequest.FromString(b) for b in collector.bodies["/v1/traces"]]
    spans = [span for t in traces for r in t.resource_spans for s in r.scope_spans
             for span in s.spans]
    chat = [s for s in spans if s.name == "chat scripted-model"]
    assert len(chat) == 1
    attributes = {a.key: a.value for a in chat[0].attributes}
    assert attributes["gen_ai.provider.name"].string_value == "openai"
    assert attributes["gen_ai.usage.output_tokens"].int_value == 2
    service = {a.key: a.value.string_value for t in traces for r in t.resource_spans
               for a in r.resource.attributes}
    assert service["service.name"] == "chat-actors"
    metrics = [ExportMetricsServiceRequest.FromString(b)
               for b in collector.bodies["/v1/metrics"]]
    names = {m.name for r in metrics for rm in r.resource_metrics for sm in rm.scope_metrics
             for m in sm.metrics}
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration"} <= names
