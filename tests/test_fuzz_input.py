"""Property-based: mutated and random requests never crash the decoder or a running intake;
every bad one lands in the DLQ, every good one completes (DESIGN 4.5)."""

from __future__ import annotations

import json

import confluent_kafka
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messages.wire import BadInput, decode_request
from tests.helpers import events_of, produce, worker_running

ALIASES = frozenset({"scripted", "priced"})
IDENT = st.text(alphabet="abcXYZ019._:-", min_size=1, max_size=20)
GOOD = st.fixed_dictionaries({
    "jobId": IDENT, "userId": IDENT, "sessionId": IDENT,
    "message": st.text(min_size=1, max_size=50),
}, optional={
    "mode": st.sampled_from(["gen", "rag"]),
    "model": st.sampled_from(sorted(ALIASES)),
    "params": st.fixed_dictionaries({}, optional={
        "temperature": st.floats(0, 2), "maxTokens": st.integers(1, 4096),
        "topP": st.floats(0.01, 1)}),
    "timeoutS": st.floats(0.1, 600),
    "extraField": st.integers(),  # unknown fields are ignored
})
# Each mutation breaks one rule of DESIGN 1.1.
MUTATIONS = {
    "drop a required field": lambda d, v: {k: x for k, x in d.items() if k != v},
    "wrong type": lambda d, v: {**d, v: 12345},
    "bad id characters": lambda d, v: {**d, "jobId": d["jobId"] + " /?"},
    "id too long": lambda d, v: {**d, "userId": "u" * 129},
    "empty message": lambda d, v: {**d, "message": ""},
    "oversize message": lambda d, v: {**d, "message": "x" * 1001},
    "unknown model alias": lambda d, v: {**d, "model": "no-such-alias"},
    "temperature out of range": lambda d, v: {**d, "params": {"temperature": 9.5}},
    "negative timeout": lambda d, v: {**d, "timeoutS": -1},
    "unknown mode": lambda d, v: {**d, "mode": "chat"},
}
REQUIRED = ["jobId", "userId", "sessionId", "message"]


@st.composite
def bad_values(draw) -> bytes:
    kind = draw(st.sampled_from([*MUTATIONS, "random bytes", "truncated json"]))
    good = draw(GOOD)
    if kind == "random bytes":
        return draw(st.binary(min_size=0, max_size=80).filter(lambda b: not b.strip().startswith(b"{")))
    if kind == "truncated json":
        raw = json.dumps(good).encode()
        return raw[: draw(st.integers(1, len(raw) - 1))]
    return json.dumps(MUTATIONS[kind](good, draw(st.sampled_from(REQUIRED)))).encode()


def decode(raw: bytes):
    return decode_request(raw, max_message_chars=1000, model_aliases=ALIASES)


@settings(max_examples=2000, deadline=None)
@given(GOOD)
def test_every_good_request_decodes(value):
    request = decode(json.dumps(value).encode())
    assert (request.job_id, request.user_id) == (value["jobId"], value["userId"])


@settings(max_examples=2000, deadline=None)
@given(bad_values())
def test_every_bad_request_is_a_bad_input_naming_a_field(raw):
    try:
        decode(raw)
    except BadInput as problem:
        assert problem.field.startswith("$") and problem.rule
    else:
        raise AssertionError(f"accepted {raw!r}")


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_decoder(raw):
    try:
        decode(raw)
    except BadInput:
        pass


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


@settings(max_examples=1, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(st.lists(bad_values(), min_size=60, max_size=60), st.lists(GOOD, min_size=20, max_size=20))
def test_a_running_intake_survives_a_mixed_burst(make_config, llm, rds, bad, good):
    config, _ = make_config()
    good = [{**g, "jobId": f"fuzz-{i}", "sessionId": f"fuzz-s{i}", "model": "scripted"}
            for i, g in enumerate(good)]
    mixed = [*bad, *[json.dumps(g).encode() for g in good]]

    async def scenario():
        async with worker_running(config):
            produce(config, *mixed)
            return [await events_of(rds, config, g["jobId"]) for g in good]

    finished = trio.run(scenario)
    assert all(events[-1]["data"]["status"] == "completed" for events in finished)
    dead = read_topic(config, config.kafka.dlq_topic, len(bad))
    assert sorted(dead, key=lambda v: v or b"") == sorted(bad)
