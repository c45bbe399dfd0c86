"""Tool and response schemas are measured before a vendor library expands them
(contract 2.1, limits.max_schema_*): a schema bomb is refused fast, by the worker's
intake and by the gateway alike, naming the field and the limit; the expanded size
is computed exactly (against a naive expansion) without ever being built."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import unquote

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messages.schemas import SchemaLimits, SchemaProblem, check_schema
from messages.wire import BadInput, decode_request
from tests.helpers import events_of, gateway_running, produce, request, worker_running
from tests.test_gateway import bearer

ALIASES = frozenset({"local"})
LIMITS = SchemaLimits()


def doubling_defs(levels: int) -> dict[str, Any]:
    """The observed bomb: each definition refers to the next one twice, so the
    expansion doubles with every level (2 KB at 19 levels expands to ~10^6 copies)."""
    defs: dict[str, Any] = {f"d{n}": {"type": "object", "properties": {
        "a": {"$ref": f"#/$defs/d{n + 1}"}, "b": {"$ref": f"#/$defs/d{n + 1}"}}}
        for n in range(levels)}
    defs[f"d{levels}"] = {"type": "string"}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def wide_defs(levels: int, fan_out: int) -> dict[str, Any]:
    """A shallow bomb: `fan_out` references per level, few levels, within any depth."""
    defs: dict[str, Any] = {f"d{n}": {"anyOf": [{"$ref": f"#/$defs/d{n + 1}"}] * fan_out}
                            for n in range(levels)}
    defs[f"d{levels}"] = {"type": "string", "description": "a leaf of some size"}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def decode(body: dict[str, Any], **limits: Any):
    return decode_request(json.dumps(body).encode(), max_message_chars=100,
                          model_aliases=ALIASES, **limits)


def with_tool(parameters: dict[str, Any], at: int = 0) -> dict[str, Any]:
    tools = [{"name": f"t{n}"} for n in range(at)] + [{"name": "bomb", "parameters": parameters}]
    return {**request("hi"), "v": 2, "tools": tools}


def refusal(body: dict[str, Any], **limits: Any) -> tuple[BadInput, float]:
    started = time.perf_counter()
    with pytest.raises(BadInput) as refused:
        decode(body, **limits)
    return refused.value, time.perf_counter() - started


# --- the naive expansion the measure is checked against ----------------------------

def _resolve(root: Any, ref: str) -> Any:
    node = root
    for token in unquote(ref[2:]).split("/") if len(ref) > 1 else ():
        step = token.replace("~1", "/").replace("~0", "~")
        node = node[int(step)] if isinstance(node, list) else node[step]
    return node


def expand(node: Any, root: Any) -> Any:
    """The schema with each `$ref` string replaced by its target's expansion (the
    object keeps its other keys), built for real: only for small acyclic inputs."""
    if isinstance(node, dict):
        return {key: expand(_resolve(root, value), root)
                if key == "$ref" and isinstance(value, str) else expand(value, root)
                for key, value in node.items()}
    if isinstance(node, list):
        return [expand(value, root) for value in node]
    return node


def depth(node: Any) -> int:
    if isinstance(node, dict | list):
        children = node.values() if isinstance(node, dict) else node
        return 1 + max(map(depth, children), default=0)
    return 0


def measured(schema: dict[str, Any]) -> tuple[int, int]:
    """(JSON bytes, depth) of the real expansion."""
    expanded = expand(schema, schema)
    return len(msgspec.json.encode(expanded)), depth(expanded)


# --- the bomb ------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [19, 40])
def test_the_doubling_defs_bomb_is_refused_fast_naming_field_and_limit(levels):
    bomb = doubling_defs(levels)
    assert len(json.dumps(bomb)) < 5000  # small as written
    # With the default limits its depth gives it away first...
    problem, took = refusal(with_tool(bomb, at=3))
    assert problem.field == "$.tools[3].parameters"
    assert "limits.max_schema_depth is 32" in problem.rule
    assert took < 0.1
    # ...and with the deepest depth allowed, its size (2^levels copies: never built).
    problem, took = refusal(with_tool(bomb), max_schema_depth=128)
    assert problem.field == "$.tools[0].parameters"
    assert "limits.max_schema_expanded_bytes is 262144" in problem.rule
    assert took < 0.1
    # The response schema is passed on the same way, and held to the same limits.
    fmt = {**request("hi"), "v": 2,
           "responseFormat": {"type": "json_schema", "name": "out", "schema": bomb}}
    problem, _ = refusal(fmt, max_schema_depth=128)
    assert problem.field == "$.responseFormat.schema"
    assert "limits.max_schema_expanded_bytes" in problem.rule


def test_a_shallow_wide_bomb_is_refused_on_its_expanded_size():
    bomb = wide_defs(levels=6, fan_out=8)  # 8^6 leaves, 22 levels deep
    problem, took = refusal(with_tool(bomb))
    assert problem.field == "$.tools[0].parameters"
    assert "limits.max_schema_expanded_bytes is 262144" in problem.rule
    assert took < 0.1


# --- references that do not resolve, or loop -------------------------------------------

@pytest.mark.parametrize(("schema", "where", "rule"), [
    ({"type": "object", "$defs": {"node": {"type": "object", "properties": {
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
      "properties": {"root": {"$ref": "#/$defs/node"}}},
     ".$defs.node.properties.children.items.$ref", "'#/$defs/node' refers back into itself"),
    ({"type": "object", "properties": {"again": {"$ref": "#"}}},
     ".properties.again.$ref", "'#' refers back into itself"),
    ({"type": "object", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
      "properties": {"p": {"$ref": "#/$defs/a"}}}, ".$defs.a.$ref", "'#/$defs/b' refers back"),
])
def test_a_ref_cycle_is_refused_naming_where_it_closes(schema, where, rule):
    problem, took = refusal(with_tool(schema, at=1))
    assert problem.field == f"$.tools[1].parameters{where}"
    assert rule in problem.rule and "recursive schema is not accepted" in problem.rule
    assert took < 0.1


@pytest.mark.parametrize(("ref", "rule"), [
    ("#/$defs/missing", "nothing in the schema is at that pointer"),
    ("#/properties/p/items/3", "nothing in the schema is at that pointer"),
    ("https://example.com/schema.json", "only a local reference"),
    ("#anchor", "only a local reference"),
    ("other.json#/$defs/a", "only a local reference"),
])
def test_a_ref_that_does_not_resolve_is_bad_input(ref, rule):
    schema = {"type": "object", "properties": {"p": {"type": "array", "items": [
        {"$ref": ref}]}}, "$defs": {"a": {"type": "string"}}}
    problem, _ = refusal(with_tool(schema))
    assert problem.field == "$.tools[0].parameters.properties.p.items[0].$ref"
    assert f"$ref {ref!r} does not resolve" in problem.rule and rule in problem.rule


def test_a_json_pointer_may_point_anywhere_in_the_schema():
    schema = {"type": "object", "properties": {
        "a/b": {"type": "string", "enum": ["x", "y"]},
        "copy": {"$ref": "#/properties/a~1b"},
        "first": {"$ref": "#/properties/a~1b/enum/0"},
        "%25": {"$ref": "#/properties/a%7E1b"}}}
    decode(with_tool(schema))  # resolves: no error
    assert measured(schema)[0] == len(msgspec.json.encode(expand(schema, schema)))


# --- each limit, at and past it ------------------------------------------------------

def _padded(size: int) -> dict[str, Any]:
    """A schema whose JSON is exactly `size` bytes."""
    schema = {"type": "object", "description": ""}
    schema["description"] = "x" * (size - len(msgspec.json.encode(schema)))
    assert len(msgspec.json.encode(schema)) == size
    return schema


def test_a_schema_of_exactly_max_schema_bytes_passes_and_one_more_does_not():
    decode(with_tool(_padded(65_536)))
    problem, took = refusal(with_tool(_padded(65_537)))
    assert problem.field == "$.tools[0].parameters"
    assert problem.rule == ("the schema is 65537 bytes of JSON; "
                            "limits.max_schema_bytes is 65536")
    assert took < 0.1
    decode(with_tool(_padded(1000)), max_schema_bytes=1000, max_schema_expanded_bytes=1000)
    problem, _ = refusal(with_tool(_padded(1001)), max_schema_bytes=1000)
    assert "limits.max_schema_bytes is 1000" in problem.rule


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels - 1):
        schema = {"type": "object", "properties": {"p": schema}}
    return schema


@pytest.mark.parametrize("with_refs", [False, True])
def test_a_schema_as_deep_as_max_schema_depth_passes_and_one_deeper_does_not(with_refs):
    """Depth counts the expansion: a $ref's target nests one level below the $ref."""
    schema = _nested(5)  # object, properties, object, ...: 9 levels
    if with_refs:  # reached through two references, each one level more
        schema = {"type": "object", "properties": {"p": {"$ref": "#/$defs/a"}},
                  "$defs": {"a": {"type": "object", "properties": {"p": {"$ref": "#/$defs/b"}}},
                            "b": {"type": "object", "properties": {"q": {"type": "string"}}}}}
    limit = measured(schema)[1]
    assert limit == 9
    decode(with_tool(schema), max_schema_depth=limit)
    problem, _ = refusal(with_tool(schema), max_schema_depth=limit - 1)
    assert problem.field == "$.tools[0].parameters"
    assert problem.rule == (f"the schema nests more than {limit - 1} levels deep with its $refs "
                            f"expanded; limits.max_schema_depth is {limit - 1}")


@pytest.mark.parametrize("at", [0, 5, 19])
def test_depth_counts_the_children_without_refs_beside_one_with_a_ref(at):
    """The measure walks only what holds a $ref; the depth of the rest still counts,
    wherever it is among many children."""
    children: list[Any] = [{"$ref": "#/$defs/a"}] + [0] * 19
    children[at or 1] = [[[[["deep"]]]]]
    schema = {"type": "object", "$defs": {"a": {"type": "string"}}, "enum": children}
    limit = measured(schema)[1]
    assert limit == 7  # schema, enum, then five lists
    check_schema(msgspec.json.decode(msgspec.json.encode(schema)),
                 LIMITS._replace(max_depth=limit))
    with pytest.raises(SchemaProblem, match="limits.max_schema_depth is 6"):
        check_schema(schema, LIMITS._replace(max_depth=limit - 1))


def test_a_schema_as_large_as_max_schema_expanded_bytes_expanded_passes():
    schema = wide_defs(levels=3, fan_out=5)
    size, _ = measured(schema)
    assert size > 5 * len(msgspec.json.encode(schema))
    decode(with_tool(schema), max_schema_expanded_bytes=size)
    problem, _ = refusal(with_tool(schema), max_schema_expanded_bytes=size - 1)
    assert problem.rule == (f"the schema would be more than {size - 1} bytes with its $refs "
                            f"expanded; limits.max_schema_expanded_bytes is {size - 1}")


# --- the measure is exact: a differential against the naive expansion -----------------

_NAMES = st.sampled_from(["type", "a", "b", "p/q", "t~x", "$ref", "items", "0", "é"])
_SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=6)
            | st.just("$ref"))


def _escaped(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


@st.composite
def acyclic_schemas(draw: st.DrawFn) -> dict[str, Any]:
    """Definitions d0..dn, where d_i refers only to d_j (j > i) or into them: any
    nesting of such references, and never a cycle."""
    count = draw(st.integers(1, 4))
    pointers: list[list[str]] = [[] for _ in range(count + 1)]

    def value(owner: int, path: list[str], depth: int) -> Any:
        choice = draw(st.integers(0, 5 if depth < 3 else 1))
        if choice == 0 and owner < count and any(pointers[owner + 1:]):
            later = [p for ps in pointers[owner + 1:] for p in ps]
            return {"$ref": draw(st.sampled_from(later)),
                    **draw(st.dictionaries(st.just("title"), _SCALARS, max_size=1))}
        if choice <= 1:
            return draw(_SCALARS)
        if choice <= 3:
            keys = draw(st.lists(_NAMES, max_size=3, unique=True))
            # A key named "$ref" that holds no string is no reference: here, a list.
            return {key: value(owner, [*path, _escaped(key)], depth + 1) if key != "$ref"
                    else [value(owner, [*path, "$ref", "0"], depth + 1)] for key in keys}
        # Now and then more children than the measure looks at one by one (it halves).
        length = draw(st.sampled_from([0, 1, 2, 3, 11]))
        return [value(owner, [*path, str(n)], depth + 1) for n in range(length)]

    defs: dict[str, Any] = {}
    for n in reversed(range(count)):  # the later ones first: the earlier refer to them
        made = value(n, ["$defs", f"d{n}"], 0)
        defs[f"d{n}"] = made
        pointers[n] = ["#/" + "/".join(p) for p in _paths(made, ["$defs", f"d{n}"])]
    root = {"type": "object", "$defs": dict(reversed(defs.items()))}
    if count:
        root["properties"] = {"x": {"$ref": draw(st.sampled_from(
            [p for ps in pointers for p in ps]))}}
    # As a decoder would hand it over: no object shared between two places.
    return msgspec.json.decode(msgspec.json.encode(root))


def _paths(node: Any, path: list[str]) -> list[list[str]]:
    found = [path]
    if isinstance(node, dict):
        for key, item in node.items():
            found += _paths(item, [*path, _escaped(key)])
    elif isinstance(node, list):
        for n, item in enumerate(node):
            found += _paths(item, [*path, str(n)])
    return found


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(acyclic_schemas())
def test_the_expanded_size_and_depth_are_those_of_the_real_expansion(schema):
    size, deepest = measured(schema)
    written = len(msgspec.json.encode(schema))
    exact = SchemaLimits(max_bytes=written, max_depth=max(deepest, 1),
                         max_expanded_bytes=size)
    check_schema(schema, exact)  # at every limit: accepted
    tighter = [(exact._replace(max_expanded_bytes=size - 1), "limits.max_schema_expanded_bytes")]
    if deepest > 1:
        tighter.append((exact._replace(max_depth=deepest - 1), "limits.max_schema_depth"))
    for limits, rule in tighter:
        with pytest.raises(SchemaProblem) as problem:
            check_schema(schema, limits)
        assert rule in problem.value.rule


# --- bounded work for anything a request can carry ------------------------------------

def test_a_megabyte_schema_is_refused_by_its_size_at_once():
    huge = {"type": "object", "enum": [{"$ref": "#/enum"}] * 52_000}
    assert 1_000_000 < len(json.dumps(with_tool(huge))) <= 1_048_576
    problem, took = refusal(with_tool(huge))
    assert "limits.max_schema_bytes is 65536" in problem.rule
    assert took < 1.0  # ~50 ms, nearly all of it decoding the request


def test_a_megabyte_of_schemas_just_within_the_limits_is_measured_in_linear_time():
    """Fifteen schemas of nearly 64 KiB each, built to make the walk work hardest: one
    reference in every small object, then thousands of objects behind one reference."""
    many_refs = {"type": "object", "$defs": {"a": {"type": "string"}},
                 "properties": {"p": {"anyOf": [{"$ref": "#/$defs/a"}] * 3000}}}
    many_objects = {"type": "object", "properties": {"p": {"$ref": "#/$defs/a"}},
                    "$defs": {"a": {"enum": [{"k": [0]}] * 5000}}}
    tools = [{"name": f"t{n}", "parameters": (many_refs, many_objects)[n % 2]}
             for n in range(15)]
    body = {**request("hi"), "v": 2, "tools": tools}
    raw = json.dumps(body).encode()
    assert 900_000 < len(raw) < 1_048_576
    started = time.perf_counter()
    decode_request(raw, max_message_chars=100, model_aliases=ALIASES)
    assert time.perf_counter() - started < 2.0


# --- the same refusal from the worker's intake and from the gateway -----------------------

async def test_the_worker_refuses_a_schema_bomb_before_any_model_call(config, llm, rds):
    bomb = with_tool(doubling_defs(19))
    after = request("still here")
    async with worker_running(config):
        produce(config, bomb, after)
        refused = await events_of(rds, config, bomb["jobId"])
        answered = await events_of(rds, config, after["jobId"])
    assert [e["event"] for e in refused] == ["error", "done"]
    error = refused[0]["data"]
    assert error["code"] == "bad_request" and "$.tools[0].parameters" in error["message"]
    assert "limits.max_schema_depth" in error["message"]
    assert refused[1]["data"]["status"] == "rejected"
    assert answered[-1]["data"]["status"] == "completed"
    assert len(llm.calls) == 1  # the bomb's job never reached the vendor


async def test_the_gateway_answers_a_schema_bomb_with_400_naming_the_limit(gw_config):
    config = gw_config(CHAT_ACTORS__LIMITS__MAX_SCHEMA_DEPTH="128")
    async with gateway_running(config) as (_, client):
        for levels in (19, 40):
            body = {"sessionId": "s", "message": "hi", "v": 2,
                    "tools": [{"name": "bomb", "parameters": doubling_defs(levels)}]}
            started = time.perf_counter()
            response = await client.post("/v1/chat", json=body, headers=bearer())
            assert time.perf_counter() - started < 5
            assert response.status_code == 400
            error = response.json()["error"]
            assert error["field"] == "$.tools[0].parameters"
            assert "limits.max_schema_expanded_bytes is 262144" in error["message"]
        cycle = {"sessionId": "s", "message": "hi", "v": 2, "responseFormat": {
            "type": "json_schema", "schema": {"type": "object", "properties": {
                "me": {"$ref": "#"}}}}}
        response = await client.post("/v1/chat", json=cycle, headers=bearer())
        assert response.status_code == 400
        assert response.json()["error"]["field"] == "$.responseFormat.schema.properties.me.$ref"
