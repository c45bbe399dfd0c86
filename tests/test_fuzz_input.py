"""Property-based: mutated, hostile and random requests never crash the decoder or a
running intake; every bad one lands in the DLQ, every good one completes (contract 6.5,
4.10). Hostile means what an attacker or a broken neighbour sends, not only a good
message with one field wrong: nesting 50,000 deep, U+0000, oversize values, invalid
UTF-8."""

from __future__ import annotations

import json
import os

import confluent_kafka
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messages.wire import BadInput, decode_control, decode_request
from tests.helpers import events_of, produce, worker_running
from tests.hostile import HOSTILE, HOSTILE_CONTROL, MAX_REQUEST_BYTES, MUTATIONS, REQUIRED, nested

ALIASES = frozenset({"scripted", "priced"})
# Bounded in the test command; `bin/chat-actors bench fuzz` runs many more.
EXAMPLES = int(os.environ.get("CHAT_ACTORS_FUZZ_EXAMPLES", "2000"))
# Text a user may send: anything but U+0000 (contract 2.1) and lone surrogates (not UTF-8).
TEXT = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
IDENT = st.text(alphabet="abcXYZ019._:-", min_size=1, max_size=20)
GOOD = st.fixed_dictionaries({
    "jobId": IDENT, "userId": IDENT, "sessionId": IDENT,
    "message": st.text(TEXT, min_size=1, max_size=50),
}, optional={
    "mode": st.sampled_from(["gen", "rag"]),
    "model": st.sampled_from(sorted(ALIASES)),
    "params": st.fixed_dictionaries({}, optional={
        "temperature": st.floats(0, 2), "maxTokens": st.integers(1, 4096),
        "topP": st.floats(0.01, 1)}),
    "timeoutS": st.floats(0.1, 600),
    "extraField": st.integers(),  # unknown fields are ignored
})
@st.composite
def bad_values(draw) -> bytes:
    kind = draw(st.sampled_from([*MUTATIONS, *HOSTILE, "random bytes", "truncated json"]))
    good = draw(GOOD)
    if kind in HOSTILE:
        return HOSTILE[kind](good, draw(st.sampled_from([33, 100, 5000, 50_000])))
    if kind == "random bytes":
        return draw(st.binary(min_size=0, max_size=80).filter(lambda b: not b.strip().startswith(b"{")))
    if kind == "truncated json":
        raw = json.dumps(good).encode()
        return raw[: draw(st.integers(1, len(raw) - 1))]
    return json.dumps(MUTATIONS[kind](good, draw(st.sampled_from(REQUIRED)))).encode()


def decode(raw: bytes):
    return decode_request(raw, max_message_chars=1000, model_aliases=ALIASES,
                          max_request_bytes=MAX_REQUEST_BYTES)


@settings(max_examples=EXAMPLES, deadline=None)
@given(GOOD)
def test_every_good_request_decodes(value):
    request = decode(json.dumps(value).encode())
    assert (request.job_id, request.user_id) == (value["jobId"], value["userId"])


@settings(max_examples=EXAMPLES, deadline=None)
@given(bad_values())
def test_every_bad_request_is_a_bad_input_naming_a_field(raw):
    try:
        decode(raw)
    except BadInput as problem:
        assert problem.field.startswith("$") and problem.rule
    else:
        raise AssertionError(f"accepted {raw!r}")


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_decoder(raw):
    try:
        decode(raw)
    except BadInput:
        pass


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.sampled_from(HOSTILE_CONTROL),
                 bad_values().map(lambda raw: b'{"type": "cancel", ' + raw[1:])))
def test_no_control_message_escapes_the_control_decoder_as_anything_but_bad_input(raw):
    # Invalid UTF-8 escaped as UnicodeDecodeError and stopped the control actor (and
    # with it every worker, again at each restart while it stayed in the history).
    try:
        decode_control(raw)
    except BadInput as problem:
        assert problem.field.startswith("$") and problem.rule


def read_topic(config, topic: str, count: int) -> list[bytes | None]:
    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": config.kafka.bootstrap_servers, "group.id": "fuzz-reader",
        "auto.offset.reset": "earliest", "log.connection.close": False})
    consumer.subscribe([topic])
    values = []
    try:
        while len(values) < count:
            message = consumer.poll(30)
            if message is None:
                break
            if message.error() is None:
                values.append(message.value())
    finally:
        consumer.close()
    return values


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_each_hostile_shape_is_bad_input_naming_where(kind):
    good = {"jobId": "j1", "userId": "u1", "sessionId": "s1", "message": "hello"}
    with pytest.raises(BadInput) as info:
        decode(HOSTILE[kind](good, 5_000))
    problem = info.value
    assert problem.field.startswith("$") and problem.rule
    if "U+0000" in kind:  # named down to the field, and the job can still be told
        assert problem.field != "$" and "U+0000" in problem.rule and problem.job_id == "j1"
    if "nested" in kind:
        assert "limit is 32" in problem.rule


def test_nesting_50000_deep_is_refused_before_the_decoder_recurses():
    good = {"jobId": "j1", "userId": "u1", "sessionId": "s1", "message": "hello"}
    for kind in ("nested deep in an unknown field", "nested deep in rag.where"):
        with pytest.raises(BadInput, match="nests 500(01|03) levels deep; the limit is 32"):
            decode_request(HOSTILE[kind](good, 50_000), max_message_chars=1000,
                           model_aliases=ALIASES)  # the default 1 MiB size limit
    # chat.control too: one such message used to stop every worker at once.
    with pytest.raises(BadInput, match="nests 30001 levels deep"):
        decode_control(b'{"type": "cancel", "x": ' + nested(30_000) + b"}")


@settings(max_examples=1, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(st.lists(bad_values(), min_size=30, max_size=30), st.lists(GOOD, min_size=20, max_size=20))
def test_a_running_intake_survives_a_mixed_burst(make_config, llm, rds, drawn, good):
    config, _ = make_config(f"""
[limits]
max_message_chars = 1000
max_request_bytes = {MAX_REQUEST_BYTES}
""")
    good = [{**g, "jobId": f"fuzz-{i}", "sessionId": f"fuzz-s{i}", "model": "scripted"}
            for i, g in enumerate(good)]
    # Every kind of bad value at least once, whatever hypothesis drew.
    template = {"jobId": "bad-j", "userId": "bad-u", "sessionId": "bad-s", "message": "m"}
    bad = [*drawn, *(build(template, 5_000) for build in HOSTILE.values()),
           *(json.dumps(mutate(template, "message")).encode() for mutate in MUTATIONS.values())]
    mixed = [value for pair in zip(bad, [json.dumps(g).encode() for g in good] * 4,
                                   strict=False) for value in pair]
    mixed += bad[len(mixed) // 2:]

    async def scenario():
        async with worker_running(config) as handle:
            produce(config, *mixed)
            finished = [await events_of(rds, config, g["jobId"]) for g in good]
            return finished, handle

    finished, _ = trio.run(scenario)
    assert all(events[-1]["data"]["status"] == "completed" for events in finished)
    dead = read_topic(config, config.kafka.dlq_topic, len(bad))
    assert sorted(dead, key=lambda v: v or b"") == sorted(bad, key=lambda v: v or b"")
