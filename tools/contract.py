"""The contract's machine-readable half, generated from the msgspec types in messages/:
a JSON Schema per Kafka value, stream entry and event body (docs/schema/), and an
AsyncAPI 3 document of the topics and the stream (docs/asyncapi.yaml).

`bin/chat-actors contract --write` rewrites them; `--check` (and the test suite)
fails when the committed files differ from what the code says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import yaml

from messages import wire

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
EVENTS: tuple[type[wire.EventBody], ...] = (
    wire.Started, wire.Retrieval, wire.Token, wire.Reasoning, wire.ToolCall,
    wire.ProviderSwitched, wire.Final, wire.Error, wire.Done)


def _schema(kind: Any, title: str, description: str) -> dict[str, Any]:
    """One self-contained JSON Schema: the type at the root, what it refers to in $defs."""
    (root,), defs = msgspec.json.schema_components([kind], ref_template="#/$defs/{name}")
    name = root["$ref"].rsplit("/", 1)[1]
    body = defs.pop(name)
    schema = {"$schema": DRAFT, "$id": f"https://chat-actors.dev/schema/{title}", **body,
              "title": title, "description": description}
    if defs:
        schema["$defs"] = defs
    return schema


def _request_schema() -> dict[str, Any]:
    schema = _schema(wire.ChatRequest, "chat.request.json",
                     "A value on the chat.request topic (contract versions "
                     f"{', '.join(map(str, wire.SCHEMA_VERSIONS))}). Unknown fields are "
                     "ignored. Rules a schema cannot say are in docs/contract.md: a v2 field "
                     'needs "v": 2; `message` may be empty only with `toolResults`; images '
                     "are checked by their bytes and URL host; no text holds U+0000.")
    schema["properties"]["v"]["enum"] = list(wire.SCHEMA_VERSIONS)
    return schema


def _entry_schema() -> dict[str, Any]:
    """A Redis stream entry: every field is a string there, numbers in decimal."""
    number = {"type": "string", "pattern": "^[0-9]+$"}
    names = {"event": {"enum": [event.EVENT for event in EVENTS]},
             "jobId": {"type": "string"}, "userId": {"type": "string"},
             "sessionId": {"type": "string"}, "attempt": number, "seq": number,
             "ts": {**number, "description": "milliseconds since the epoch"},
             "data": {"type": "string", "contentMediaType": "application/json",
                      "description": "the event's body: schema/events/<event>.json"}}
    fields = [field.encode_name for field in msgspec.structs.fields(wire.StreamEvent)]
    camel = {"job_id": "jobId", "user_id": "userId", "session_id": "sessionId"}
    properties = {camel.get(name, name): names[camel.get(name, name)] for name in fields}
    return {"$schema": DRAFT, "$id": "https://chat-actors.dev/schema/stream-entry.json",
            "title": "stream-entry.json",
            "description": "One entry of a job's Redis stream (stream.key_template). `seq` "
                           "counts from 0 within an attempt; `done` is last, once per job.",
            "type": "object", "properties": properties, "required": list(properties)}


def schemas() -> dict[str, dict[str, Any]]:
    """Every schema by its path under docs/."""
    found = {
        "schema/chat.request.json": _request_schema(),
        "schema/chat.control.json": _schema(
            wire.ControlMessage, "chat.control.json",
            "A value on the chat.control topic: cancel a job (honoured only from its user)."),
        "schema/stream-entry.json": _entry_schema(),
    }
    for event in EVENTS:
        found[f"schema/events/{event.EVENT}.json"] = _schema(
            event, f"events/{event.EVENT}.json",
            f"The `data` of a `{event.EVENT}` stream entry. {_summary(event)}")
    return found


def _summary(kind: type) -> str:
    return " ".join((kind.__doc__ or "").split())


def _message(name: str, summary: str, payload: str) -> dict[str, Any]:
    return {"name": name, "summary": summary, "contentType": "application/json",
            "payload": {"$ref": payload}}


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3 document: the worker receives requests and cancels, sends rejects
    to the dead-letter topic and events to each job's stream."""
    events = {f"{event.EVENT}Event": {
        "name": event.EVENT, "contentType": "application/json",
        "summary": _summary(event),
        "payload": {"$ref": "./schema/stream-entry.json"},
        "x-data": {"$ref": f"./schema/events/{event.EVENT}.json"}} for event in EVENTS}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "chat-actors", "version": str(max(wire.SCHEMA_VERSIONS)),
                 "description": "The streaming chat worker's contract: requests and cancels "
                                "on Kafka in, events on one Redis stream per job out. Prose "
                                "and the rules a schema cannot say: docs/contract.md."},
        "servers": {
            "kafka": {"host": "127.0.0.1:9092", "protocol": "kafka",
                      "description": "kafka.bootstrap_servers"},
            "redis": {"host": "127.0.0.1:6379", "protocol": "redis",
                      "description": "redis.url"}},
        "channels": {
            "chatRequest": {
                "address": "chat.request", "servers": [{"$ref": "#/servers/kafka"}],
                "description": "kafka.request_topic; keyed by sessionId.",
                "messages": {"chatRequest": _message(
                    "chat.request", "Ask for one answer.", "./schema/chat.request.json")}},
            "chatControl": {
                "address": "chat.control", "servers": [{"$ref": "#/servers/kafka"}],
                "description": "kafka.control_topic; every worker reads every partition.",
                "messages": {"cancel": _message(
                    "cancel", "Cancel a job.", "./schema/chat.control.json")}},
            "chatRequestDlq": {
                "address": "chat.request.dlq", "servers": [{"$ref": "#/servers/kafka"}],
                "description": "kafka.dlq_topic: a bad request unchanged, with headers "
                               "error.class, error.message, source.topic, "
                               "source.partition, source.offset.",
                "messages": {"rejected": {
                    "name": "rejected", "summary": "A request that broke the contract.",
                    "headers": {"type": "object", "properties": {
                        name: {"type": "string"} for name in (
                            "error.class", "error.message", "source.topic",
                            "source.partition", "source.offset")}}}}},
            "jobEvents": {
                "address": "sse:chat:{jobId}", "servers": [{"$ref": "#/servers/redis"}],
                "description": "stream.key_template: one Redis stream per job (XADD).",
                "parameters": {"jobId": {"description": "the request's jobId"}},
                "messages": events}},
        "operations": {
            "receiveRequests": {"action": "receive",
                                "channel": {"$ref": "#/channels/chatRequest"}},
            "receiveCancels": {"action": "receive",
                               "channel": {"$ref": "#/channels/chatControl"}},
            "sendRejected": {"action": "send",
                             "channel": {"$ref": "#/channels/chatRequestDlq"}},
            "sendEvents": {"action": "send", "channel": {"$ref": "#/channels/jobEvents"},
                           "messages": [{"$ref": f"#/channels/jobEvents/messages/{name}"}
                                        for name in events]}},
    }


def rendered() -> dict[str, str]:
    """Every generated file's text, by its path under docs/."""
    files = {path: json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
             for path, schema in schemas().items()}
    files["asyncapi.yaml"] = ("# Generated by `bin/chat-actors contract --write` from messages/;"
                              " do not edit.\n"
                              + yaml.safe_dump(asyncapi(), sort_keys=False, width=100))
    return files


def drifted(docs: Path = DOCS) -> list[str]:
    """The generated files that differ from (or are missing in) `docs`."""
    return [path for path, text in rendered().items()
            if not (docs / path).is_file() or (docs / path).read_text(encoding="utf-8") != text]


def write(docs: Path = DOCS) -> list[str]:
    """Write the files that drifted; return their paths."""
    changed = drifted(docs)
    texts = rendered()
    for path in changed:
        (docs / path).parent.mkdir(parents=True, exist_ok=True)
        (docs / path).write_text(texts[path], encoding="utf-8")
    return changed
