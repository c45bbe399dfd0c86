"""The contract inside the repository (docs/): the generated JSON Schemas and AsyncAPI
document match the code, the schemas agree with the decoder and the encoder, and
docs/contract.md names every field, event, config key and column the code has."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import yaml

from config import ModelAlias
from messages import wire
from tests.helpers import ROOT
from tests.hostile import MUTATIONS
from tests.images import data_url, png
from tools import contract

DOCS = ROOT / "docs"
PAGE = (DOCS / "contract.md").read_text(encoding="utf-8")


def _validator(path: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((DOCS / path).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_generated_files_are_what_the_code_says(tmp_path):
    assert contract.drifted() == [], "run bin/chat-actors contract --write"
    # ... and the check sees a change: a stale copy of the files is reported.
    for path, text in contract.rendered().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text.replace('"type"', '"kind"', 1), encoding="utf-8")
    assert set(contract.drifted(tmp_path)) >= {"schema/chat.request.json", "schema/events/done.json"}


GOOD_REQUESTS: list[dict[str, Any]] = [
    {"jobId": "j-1", "userId": "alice", "sessionId": "s", "message": "Hi"},
    {"jobId": "j.2:x", "userId": "bob", "sessionId": "s-2", "message": "Search", "mode": "rag",
     "rag": {"collection": "user-bob", "topK": 3, "where": {"source": "a.md"}},
     "params": {"temperature": 0.2, "maxTokens": 100, "topP": 0.9, "stop": ["\n\n"]},
     "timeoutS": 30, "traceId": "0af7651916cd43dd8448eb211c80319c", "model": "local"},
    {"v": 2, "jobId": "j-3", "userId": "carol", "sessionId": "s", "message": "Weather?",
     "tools": [{"name": "get_weather", "description": "now",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
     "toolChoice": {"name": "get_weather"}, "responseFormat": {"type": "json_object"},
     "params": {"seed": 7, "reasoningEffort": "low"},
     "attachments": [{"type": "image", "url": data_url("png", png(3, 3))}]},
    {"v": 2, "jobId": "j-4", "userId": "carol", "sessionId": "s", "message": "",
     "toolResults": [{"toolCallId": "call_1", "content": "21 C"}]},
    {"v": 3, "jobId": "j-5", "userId": "dave", "sessionId": "cc-j-5", "message": "And now?",
     "history": [{"role": "developer", "content": "Be brief."},
                 {"role": "user", "content": [{"type": "text", "text": "Look"},
                                              {"type": "image", "url": data_url("png", png(2, 2))}]},
                 {"role": "assistant", "content": "", "toolCalls": [
                     {"id": "c1", "name": "f", "arguments": "{}"}]},
                 {"role": "tool", "toolCallId": "c1", "content": "ok"},
                 {"role": "assistant", "content": "Done."}],
     "store": False, "apiKeyId": "key_0123", "endUser": "end-7", "metadata": {"a": "b"},
     "params": {"frequencyPenalty": 0.5, "presencePenalty": -0.5, "logitBias": {"50256": -100}}},
]


@pytest.mark.parametrize("request_body", GOOD_REQUESTS)
def test_a_request_the_worker_takes_is_valid_by_the_schema(request_body):
    wire.decode_request(json.dumps(request_body).encode(), max_message_chars=1000,
                        model_aliases=frozenset({"local"}))
    _validator("schema/chat.request.json").validate(request_body)


@pytest.mark.parametrize("mutation", ["drop a required field", "wrong type", "bad id characters",
                                      "id too long", "temperature out of range",
                                      "negative timeout", "unknown mode"])
def test_a_request_the_schema_refuses_the_worker_refuses_too(mutation):
    bad = MUTATIONS[mutation](GOOD_REQUESTS[0], "jobId")
    assert not _validator("schema/chat.request.json").is_valid(bad)
    with pytest.raises(wire.BadInput):
        wire.decode_request(json.dumps(bad).encode(), max_message_chars=1000,
                            model_aliases=frozenset({"local"}))
    assert not _validator("schema/chat.request.json").is_valid({**GOOD_REQUESTS[0], "v": 4})


EVENTS: list[wire.EventBody] = [
    wire.Started(model="local", mode="gen", attempt=1),
    wire.Retrieval(step="vector", query="q", hits=[
        wire.RetrievalHit(id="c1", score=0.5, source="a.md", snippet="text")]),
    wire.Token(text="Hel"), wire.Reasoning(text="thinking"),
    wire.ToolCall(index=0, id="call_1", name="f", arguments='{"a": 1}'),
    wire.ProviderSwitched(from_="a", to="b", reason="429"),
    wire.Final(text="Hello", finish_reason="stop", cost_usd=0.001, model="local",
               usage=wire.Usage(prompt_tokens=10, completion_tokens=2, total_tokens=12,
                                cached_tokens=8, reasoning_tokens=1),
               tool_calls=[wire.ToolCall(index=0, id="c", name="f", arguments="{}")],
               retries=1, sources=["c1"]),
    wire.Error(code="timeout", message="no token in 30 s", retryable=True),
    wire.Done(status="completed", partial=False),
]


def test_every_event_the_worker_writes_is_valid_by_its_schema():
    assert {type(e).EVENT for e in EVENTS} == {e.EVENT for e in contract.EVENTS}
    entry = _validator("schema/stream-entry.json")
    for seq, body in enumerate(EVENTS):
        data = wire.event_data(body)
        _validator(f"schema/events/{type(body).EVENT}.json").validate(json.loads(data))
        event = wire.StreamEvent(event=type(body).EVENT, job_id="j", user_id="u", session_id="s",
                                 attempt=1, seq=seq, ts=wire.now_ms(), data=data)
        # Redis keeps every field as a string.
        entry.validate({k: v.decode() if isinstance(v, bytes) else str(v)
                        for k, v in event.fields().items()})
    usage = _validator("schema/events/final.json")
    assert not usage.is_valid({**json.loads(wire.event_data(EVENTS[6])), "usage": {"x": 1}})


def test_the_asyncapi_document_covers_every_topic_and_event_and_its_refs_resolve():
    document = yaml.safe_load((DOCS / "asyncapi.yaml").read_text(encoding="utf-8"))
    assert document["asyncapi"].startswith("3.")
    channels = document["channels"]
    assert {c["address"] for c in channels.values()} == {
        "chat.request", "chat.control", "chat.request.dlq", "sse:chat:{jobId}"}
    assert {m["name"] for m in channels["jobEvents"]["messages"].values()} == {
        e.EVENT for e in contract.EVENTS}
    refs = re.findall(r"\$ref: (\./\S+)", (DOCS / "asyncapi.yaml").read_text(encoding="utf-8"))
    assert refs and all((DOCS / ref).is_file() for ref in refs)


def _schema_fields(schema: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for part in [schema, *schema.get("$defs", {}).values()]:
        names |= set(part.get("properties", {}))
    return names


def _named(name: str) -> bool:
    return re.search(rf"`[^`]*\b{re.escape(name)}\b[^`]*`", PAGE) is not None


def test_the_page_names_every_field_and_event():
    fields = set()
    for path in contract.schemas():
        fields |= _schema_fields(contract.schemas()[path])
    missing = sorted(name for name in fields if not _named(name))
    assert missing == []
    assert [e.EVENT for e in contract.EVENTS if not _named(e.EVENT)] == []


def test_the_page_names_every_config_key_column_and_table():
    defaults = tomllib.loads((ROOT / "config" / "default.toml").read_text(encoding="utf-8"))
    # Every key of every section (a table inside a section is one key), and every key
    # an alias under llm.models may set.
    keys = {key for section, table in defaults.items() if section != "llm" for key in table}
    keys |= {key for key, value in defaults["llm"].items() if not isinstance(value, dict)}
    keys |= {field.encode_name for field in msgspec.structs.fields(ModelAlias)}
    assert sorted(k for k in keys if not _named(k)) == []
    sql = "\n".join(p.read_text(encoding="utf-8")
                    for p in sorted((ROOT / "actors/adapters/migrations").glob("*.sql")))
    sql = re.sub(r"--[^\n]*", "", sql)
    columns = set(re.findall(r"ADD COLUMN IF NOT EXISTS (\w+)", sql))
    for table in re.findall(r"CREATE TABLE IF NOT EXISTS \w+ \((.*?)\n\);", sql, re.S):
        columns |= {line.split()[0] for line in table.splitlines()
                    if re.match(r"\s+[a-z_]+\s+[a-z]", line)}
    tables = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", sql)) - {
        "chat_actors_migrations"}
    assert sorted(c for c in columns | tables if not _named(c)) == []


def test_the_repository_points_only_at_files_inside_it():
    """README, docs, benchmarks, examples and code name no file outside the clone."""
    texts = [ROOT / "README.md", ROOT / "pyproject.toml",
             *(p for folder in ("docs", "bench", "tools", "config", "actors", "messages", "bin",
                                "tests", ".ci")
               for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in (
                   ".md", ".py", ".toml", ".json", ".yaml", ".sh", "") and "__pycache__" not in
               p.parts and p.name != Path(__file__).name)]
    outside = [str(p.relative_to(ROOT)) for p in texts
               if re.search(r"\.\./shared|DESIGN\.md", p.read_text(encoding="utf-8",
                                                                    errors="replace"))]
    assert outside == []
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text()):
        assert (ROOT / link).exists(), link
