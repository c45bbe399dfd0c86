"""OpenAI's API on the gateway (docs/contract.md 7.2), driven by the official `openai`
Python SDK (3.x) against the real stack: a worker, the gateway, Kafka, Redis and
Postgres; only the vendor is scripted. Each call runs the SDK's own (blocking) client
in a thread, as an application would."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import h11
import openai
import pydantic
import pytest
import trio

from gateway import app
from tests.helpers import gateway_running, until, wait_calls, worker_running
from tests.scripted_llm import Reply
from tests.test_gateway import token

T = TypeVar("T")
HI = [{"role": "user", "content": "Hi"}]


_OPENED: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Every SDK client a test made is closed at its end: its pooled sockets are not
    left for the garbage collector (a ResourceWarning in whichever test runs then)."""
    yield
    while _OPENED:
        _OPENED.pop().close()


def sdk(port: int, user: str = "alice", **kwargs: Any) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                           api_key=kwargs.pop("api_key", None) or token(user), max_retries=0,
                           timeout=60, **kwargs)
    _OPENED.append(client)
    return client


async def call(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


def stream_text(client: openai.OpenAI, **kwargs: Any) -> tuple[str, list[Any]]:
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


async def test_models_list_every_alias_in_openais_shape(gw_config):
    config = gw_config()
    async with gateway_running(config) as (handle, _):
        listed = await call(lambda: sdk(handle.port).models.list())
    assert sorted(m.id for m in listed.data) == sorted(config.llm.models)
    assert {m.owned_by for m in listed.data} == {"chat-actors"}
    assert {m.object for m in listed.data} == {"model"}


async def test_a_completion_carries_the_conversation_and_stores_nothing(gw_config, llm, db):
    config = gw_config()
    llm.default = Reply(tokens=("Paris", " it", " is."))
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Which France?"},
                {"role": "user", "content": [{"type": "text", "text": "The "},
                                             {"type": "text", "text": "country."}]}]
    async with worker_running(config), gateway_running(config) as (handle, _):
        client = sdk(handle.port)
        raw = await call(lambda: client.chat.completions.with_raw_response.create(
            model="scripted", messages=messages, user="end-user-7", metadata={"k": "v"}))
        done = raw.parse()
    assert done.object == "chat.completion" and done.model == "scripted"
    assert done.choices[0].message.content == "Paris it is."
    assert done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens > 0 and done.usage.total_tokens == (
        done.usage.prompt_tokens + done.usage.completion_tokens)
    job_id = raw.headers["x-request-id"]
    assert done.id == f"chatcmpl-{job_id}"
    # The vendor got the client's conversation as sent: no system prompt of ours, no
    # stored history, the developer message as a system one.
    sent = llm.calls[-1].messages
    assert [(m["role"], m["content"]) for m in sent] == [
        ("system", "Answer briefly."), ("user", "Capital of France?"),
        ("assistant", "Which France?"), ("user", "The country.")]
    row = db.execute("SELECT session_id, status, end_user, metadata, completion_tokens "
                     "FROM llm_jobs WHERE job_id = %s", (job_id,)).fetchone()
    assert row == (f"cc-{job_id}", "completed", "end-user-7", {"k": "v"},
                   done.usage.completion_tokens)
    assert db.execute("SELECT count(*) FROM llm_messages WHERE job_id = %s",
                      (job_id,)).fetchone() == (0,)


async def test_store_true_keeps_the_exchange_but_never_lists_its_session(gw_config, llm, db):
    config = gw_config()
    llm.default = Reply(tokens=("Kept",))
    async with worker_running(config), gateway_running(config) as (handle, client):
        raw = await call(lambda: sdk(handle.port, "store-user").chat.completions
                         .with_raw_response.create(model="scripted", store=True,
                                                   messages=[{"role": "user", "content": "Hi"}]))
        job_id = raw.headers["x-request-id"]
        listed = await client.get("/v1/sessions",
                                  headers={"Authorization": f"Bearer {token('store-user')}"})
    rows = db.execute("SELECT role, content FROM llm_messages WHERE job_id = %s ORDER BY id",
                      (job_id,)).fetchall()
    assert rows == [("user", "Hi"), ("assistant", "Kept")]
    assert listed.json() == {"sessions": []}


async def test_a_stream_is_openais_chunks_with_usage_last(gw_config, llm):
    config = gw_config()
    llm.default = Reply(tokens=("One", " two", " three"), reasoning=("Think", "ing"))
    async with worker_running(config), gateway_running(config) as (handle, _):
        text, chunks = await call(lambda: stream_text(
            sdk(handle.port), model="scripted", stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Count"}]))
    assert text == "One two three"
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                        for c in chunks if c.choices)
    assert reasoning == "Thinking"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and
            c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert {c.model for c in chunks} == {"scripted"} and len({c.id for c in chunks}) == 1


async def test_tool_calls_stream_by_index_and_results_go_back(gw_config, llm):
    config = gw_config(CHAT_ACTORS__LLM__MODELS__SCRIPTED__TOOLS="true")
    tools = [{"type": "function", "function": {
        "name": "weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}]
    llm.queue(Reply(tokens=(), finish_reason="tool_calls",
                    tool_calls=(("call_1", "weather", ('{"city"', ': "Oslo"}')),
                                ("call_2", "weather", ('{"city": "Rome"}',)))),
              Reply(tokens=("Cold", " and warm.")))
    async with worker_running(config), gateway_running(config) as (handle, _):
        client = sdk(handle.port)
        first = await call(lambda: list(client.chat.completions.create(
            model="scripted", stream=True, tools=tools,
            messages=[{"role": "user", "content": "Weather?"}])))
        calls: dict[int, dict[str, str]] = {}
        for chunk in first:
            for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                got = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                got["id"] += delta.id or ""
                got["name"] += delta.function.name or ""
                got["arguments"] += delta.function.arguments or ""
        assert calls == {0: {"id": "call_1", "name": "weather", "arguments": '{"city": "Oslo"}'},
                         1: {"id": "call_2", "name": "weather", "arguments": '{"city": "Rome"}'}}
        assert [c.choices[0].finish_reason for c in first if c.choices and
                c.choices[0].finish_reason] == ["tool_calls"]
        history = [{"role": "user", "content": "Weather?"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": c["id"], "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]}}
                       for c in calls.values()]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
                   {"role": "tool", "tool_call_id": "call_2", "content": "24 C"}]
        second = await call(lambda: client.chat.completions.create(
            model="scripted", tools=tools, messages=history))
    assert second.choices[0].message.content == "Cold and warm."
    sent = llm.calls[-1].messages
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert [m.get("tool_call_id") for m in sent[2:]] == ["call_1", "call_2"]


class City(pydantic.BaseModel):
    name: str
    population: int


async def test_structured_output_parses_with_the_sdks_parse(gw_config, llm):
    config = gw_config()
    llm.default = Reply(tokens=('{"name": "Oslo",', ' "population": 700000}'))
    async with worker_running(config), gateway_running(config) as (handle, _):
        parsed = await call(lambda: sdk(handle.port).chat.completions.parse(
            model="scripted", response_format=City,
            messages=[{"role": "user", "content": "A city"}]))
    assert parsed.choices[0].message.parsed == City(name="Oslo", population=700000)
    sent = llm.calls[-1]
    assert sent.body["response_format"]["type"] == "json_schema"
    assert sent.body["response_format"]["json_schema"]["name"] == "City"


async def test_refusals_are_the_sdks_exception_classes(gw_config, llm):
    config = gw_config(CHAT_ACTORS__BUDGETS__USER="{ usd = 0.0000001, rpm = 0, tpm = 0 }")
    async with worker_running(config), gateway_running(config) as (handle, _):
        hi = [{"role": "user", "content": "Hi"}]
        client = sdk(handle.port)
        cases: list[tuple[type[openai.APIError], Callable[[], Any], str | None]] = [
            (openai.AuthenticationError, lambda: sdk(handle.port, api_key="nope")
             .chat.completions.create(model="scripted", messages=hi), None),
            (openai.NotFoundError, lambda: client.chat.completions.create(
                model="gpt-nonexistent", messages=hi), "model"),
            (openai.BadRequestError, lambda: client.chat.completions.create(
                model="scripted", messages=hi, n=2), "n"),
            (openai.BadRequestError, lambda: client.chat.completions.create(
                model="scripted", messages=hi, logprobs=True), "logprobs"),
            (openai.BadRequestError, lambda: client.chat.completions.create(
                model="scripted", messages=[{"role": "function", "content": "x",
                                             "name": "f"}]), "messages[0].role"),
            (openai.BadRequestError, lambda: client.chat.completions.create(
                model="scripted", messages=hi, temperature=7), "temperature"),
            (openai.RateLimitError, lambda: client.chat.completions.create(
                model="priced", messages=hi), None),
        ]
        for kind, make, param in cases:
            with pytest.raises(kind) as caught:
                await call(make)
            error = caught.value
            assert isinstance(error.body, dict) and error.body.get("message"), kind
            if param is not None:
                assert error.body.get("param") == param, (kind, error.body)
        quota = caught.value
        assert quota.body["type"] == "insufficient_quota"
        assert quota.response.headers["x-should-retry"] == "false"


async def test_over_the_context_window_is_context_length_exceeded(gw_config, llm):
    config = gw_config()
    long = "word " * 5000  # over the scripted alias's 4,096-token window, never trimmed
    async with worker_running(config), gateway_running(config) as (handle, _):
        with pytest.raises(openai.BadRequestError) as caught:
            await call(lambda: sdk(handle.port).chat.completions.create(
                model="scripted", messages=[{"role": "user", "content": long},
                                            {"role": "assistant", "content": "ok"},
                                            {"role": "user", "content": "and?"}]))
    assert caught.value.code == "context_length_exceeded"
    assert not llm.calls


def hang_up_after(client: openai.OpenAI, text: str) -> str:
    """Stream a completion and close it once `text` arrived; the job's id."""
    raw = client.chat.completions.with_raw_response.create(
        model="scripted", stream=True, messages=[{"role": "user", "content": "Long one"}])
    stream = raw.parse()
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content == text:
            break
    stream.close()
    return raw.headers["x-request-id"]


async def test_a_client_that_hangs_up_cancels_its_job(gw_config, llm, db):
    config = gw_config()
    llm.default = Reply(tokens=tuple(f"w{n} " for n in range(200)), token_delay_s=0.05)
    async with worker_running(config), gateway_running(config) as (handle, _):
        job_id = await call(lambda: hang_up_after(sdk(handle.port), "w1 "))
        await until(lambda: db.execute("SELECT status FROM llm_jobs WHERE job_id = %s",
                                       (job_id,)).fetchone() == ("cancelled",))
    assert llm.calls[-1].disconnected  # the vendor's stream was stopped too


async def test_cors_answers_a_listed_origins_preflight_only(gw_config):
    config = gw_config(CHAT_ACTORS__GATEWAY__CORS_ORIGINS='["https://app.example"]')
    asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count"
    async with gateway_running(config) as (_, client):
        listed = await client.options("/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked})
        other = await client.options("/v1/chat/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked})
        models = await client.get("/v1/models", headers={
            "Origin": "https://app.example", "Authorization": f"Bearer {token()}"})
    assert listed.status_code == 204
    assert listed.headers["access-control-allow-origin"] == "https://app.example"
    assert listed.headers["access-control-allow-headers"] == asked
    assert "access-control-allow-origin" not in other.headers
    assert models.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in models.headers["access-control-expose-headers"]


async def test_an_api_key_is_a_bearer_token_recorded_with_the_job_until_revoked(
        gw_config, llm, db, pg):
    config = gw_config()
    llm.default = Reply(tokens=("By", " key"))
    user = f"key-user-{uuid.uuid4().hex[:8]}"
    key_id, key = await pg.create_key(user_id=user, name="ci")
    async with worker_running(config), gateway_running(config) as (handle, _):
        client = sdk(handle.port, api_key=key)
        raw = await call(lambda: client.chat.completions.with_raw_response.create(
            model="scripted", messages=HI))
        assert raw.parse().choices[0].message.content == "By key"
        job_id = raw.headers["x-request-id"]
        assert db.execute("SELECT user_id, api_key_id FROM llm_jobs WHERE job_id = %s",
                          (job_id,)).fetchone() == (user, key_id)
        assert await pg.revoke_key(key_id)

        def refused() -> bool:
            try:
                client.models.list()
            except openai.AuthenticationError:
                return True
            return False

        # Every gateway refuses it within 5 s: seen only by asking again.
        with trio.fail_after(10):
            while not await call(refused):  # noqa: ASYNC110
                await trio.sleep(0.2)


async def test_no_worker_in_time_is_503_and_a_rate_limit_says_when_to_retry(
        gw_config, llm, db, rds):
    config = gw_config(CHAT_ACTORS__GATEWAY__STREAM_WAIT_S="0.5",
                       CHAT_ACTORS__BUDGETS__USER="{ usd = 0, rpm = 1, tpm = 0 }")
    async with gateway_running(config) as (handle, _):
        with pytest.raises(openai.InternalServerError) as caught:
            await call(lambda: sdk(handle.port).chat.completions.create(
                model="scripted", messages=HI))
        assert caught.value.status_code == 503 and caught.value.code == "not_started"
    refused = caught.value.response.headers["x-request-id"]
    user = f"rpm-{uuid.uuid4().hex[:8]}"
    async with worker_running(config), gateway_running(config) as (handle, _):
        # Nothing was produced: the refused job is fenced, and the worker that gets its
        # request later ends it without calling the vendor.
        await until(lambda: any(e["event"] == "done" for e in events_of_now(rds, config,
                                                                            refused)))
        assert db.execute("SELECT status FROM llm_jobs WHERE job_id = %s",
                          (refused,)).fetchone() == ("cancelled",)
        assert not llm.calls
        client = sdk(handle.port, user)
        await call(lambda: client.chat.completions.create(model="scripted", messages=HI))
        with pytest.raises(openai.RateLimitError) as limited:
            await call(lambda: client.chat.completions.create(model="scripted", messages=HI))
    headers = limited.value.response.headers
    assert limited.value.code == "rate_limit_exceeded"
    assert 1 <= int(headers["retry-after"]) <= 60
    assert int(headers["retry-after-ms"]) >= 1000 * (int(headers["retry-after"]) - 1)


async def test_an_idempotency_key_answers_a_repeat_with_the_first_calls_job(gw_config, llm):
    config = gw_config()
    llm.default = Reply(tokens=("Only", " once"))
    key = {"Idempotency-Key": f"cc-{uuid.uuid4().hex}"}
    async with worker_running(config), gateway_running(config) as (handle, _):
        client = sdk(handle.port, default_headers=key)
        first = await call(lambda: client.chat.completions.with_raw_response.create(
            model="scripted", messages=HI))
        again = await call(lambda: client.chat.completions.with_raw_response.create(
            model="scripted", messages=HI))
    assert first.headers["x-request-id"] == again.headers["x-request-id"]
    assert first.parse().choices[0].message.content == again.parse().choices[0].message.content
    assert len(llm.calls) == 1


async def test_hostile_bodies_get_openais_error_shape_and_the_gateway_goes_on(gw_config, llm):
    config = gw_config(CHAT_ACTORS__LIMITS__MAX_REQUEST_BYTES="4096")
    url = "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {token()}"}
    cases: list[tuple[bytes, int, str | None]] = [
        (b"{not json", 400, None),
        (b"[" * 100_000 + b"]" * 100_000, 400, None),
        (b'"a string"', 400, "body"),
        (json.dumps({"model": "scripted", "messages": [
            {"role": "user", "content": "x" * 5000}]}).encode(), 413, "messages"),
        (json.dumps({"model": "scripted", "messages": [
            {"role": "user", "content": "\u0000"}]}).encode(), 400, "messages"),
        (json.dumps({"model": "scripted", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/x"}}]}]}
                    ).encode(), 400, "messages"),
        (b'{"model": "scripted", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
         400, None),
    ]
    async with gateway_running(config) as (_, client):
        for raw, status, param in cases:
            response = await client.post(url, content=raw, headers=auth)
            assert response.status_code == status, (raw[:60], response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert error["message"]
            if param is not None:
                assert str(error["param"]).startswith(param), error
        listed = await client.get("/v1/models", headers=auth)
        assert listed.status_code == 200  # and it serves on
        native = await client.post("/v1/chat", json={"sessionId": "cc-mine", "message": "x"},
                                   headers=auth)
        assert native.status_code == 400 and native.json()["error"]["field"] == "$.sessionId"


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_examples() -> tuple[str, str]:
    """README's Python SDK example and its curl example, as written."""
    section = README.read_text().split("### Use it from any OpenAI client", 1)[1]
    section = section.split("\n## ", 1)[0]
    (python,) = re.findall(r"```python\n(.*?)```", section, re.S)
    curl = next(block for block in re.findall(r"```console\n(.*?)```", section, re.S)
                if block.startswith("curl "))
    return python, curl.replace("\\\n", " ")


async def test_readmes_python_and_curl_examples_run_as_written(gw_config, make_config, llm,
                                                                pg):
    gw_config()  # the test's JWT secret in the environment
    config, _ = make_config(extra=f"""
[llm.models.local]
model = "openai/scripted-model"
api_base = "{llm.url}"
api_key_env = "SCRIPTED_LLM_KEY"
context_window = 4096
max_tokens = 256
""", environ={"CHAT_ACTORS__GATEWAY__PORT": "0", "CHAT_ACTORS__GATEWAY__HOST": "127.0.0.1"})
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: README's curl example is not run")
    python, curl = readme_examples()
    llm.default = Reply(tokens=("Rayleigh", " scattering."))
    _, key = await pg.create_key(user_id=f"readme-{uuid.uuid4().hex[:8]}")
    async with worker_running(config), gateway_running(config) as (handle, _):
        env = {**os.environ, "OPENAI_BASE_URL": f"http://127.0.0.1:{handle.port}/v1",
               "OPENAI_API_KEY": key}
        ran = await trio.run_process([sys.executable, "-c", python], env=env,
                                     capture_stdout=True, capture_stderr=True)
        fetched = await trio.run_process(["bash", "-c", curl], env=env, capture_stdout=True,
                                         capture_stderr=True)
    assert re.fullmatch(r"Rayleigh scattering\.\n\[\d+ tokens\]\n", ran.stdout.decode()), ran
    answer = json.loads(fetched.stdout)
    assert answer["choices"][0]["message"]["content"] == "Rayleigh scattering."
    assert answer["model"] == "local"


def events_of_now(rds: Any, config: Any, job_id: str) -> list[dict[str, str]]:
    """The job's stream entries' fields, read now."""
    return [fields for _, fields in rds.xrange(config.job_keys(job_id).stream)
            if fields.get("jobId") == job_id]


async def test_a_call_holds_one_of_the_users_stream_slots_until_it_ends(gw_config, llm):
    config = gw_config(CHAT_ACTORS__GATEWAY__MAX_STREAMS_PER_USER="1")
    llm.default = Reply(tokens=tuple(f"s{n} " for n in range(40)), token_delay_s=0.05)
    async with worker_running(config), gateway_running(config) as (handle, _):
        client = sdk(handle.port, "one-slot")
        opened = trio.Event()
        results: list[str] = []

        def first() -> None:
            stream = client.chat.completions.create(model="scripted", messages=HI, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    trio.from_thread.run_sync(opened.set)
                    results.append(chunk.choices[0].delta.content)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, first)
            await opened.wait()
            with pytest.raises(openai.RateLimitError) as caught:
                await call(lambda: client.chat.completions.create(model="scripted",
                                                                  messages=HI))
        assert "max_streams_per_user" in caught.value.message
        assert "".join(results) == "".join(f"s{n} " for n in range(40))
        again = await call(lambda: client.chat.completions.create(model="scripted",
                                                                  messages=HI))
        assert again.choices[0].message.content  # the slot came back at its end


async def test_a_native_request_made_with_a_key_records_it(gw_config, llm, db, pg):
    config = gw_config()
    key_id, key = await pg.create_key(user_id=f"native-{uuid.uuid4().hex[:8]}")
    async with worker_running(config), gateway_running(config) as (_, client):
        accepted = await client.post("/v1/chat", json={"sessionId": "s-key", "message": "Hi"},
                                     headers={"Authorization": f"Bearer {key}"})
        assert accepted.status_code == 202
        job_id = accepted.json()["jobId"]
        await until(lambda: db.execute("SELECT status, api_key_id FROM llm_jobs WHERE "
                                       "job_id = %s", (job_id,)).fetchone()
                    == ("completed", key_id))
        sneaky = await client.post("/v1/chat", headers={"Authorization": f"Bearer {key}"},
                                   json={"sessionId": "s", "message": "x", "apiKeyId": "k2"})
    assert sneaky.status_code == 400 and sneaky.json()["error"]["field"] == "$.apiKeyId"


async def test_a_client_that_reads_late_gets_every_chunk_once(gw_config, llm, monkeypatch):
    """The socket refuses what a client does not read: that stream falls behind and
    catches up from Redis (app.follow), its chunks framed again from where the client
    is, never twice and never missing one."""
    config = gw_config()
    words = tuple(f"word{n:04d} " * 40 for n in range(400))  # 176 KB of text, more as SSE
    llm.default = Reply(tokens=words)
    caught_up: list[int] = []
    real_catch_up = app._catch_up

    async def counted(*args: Any) -> None:
        caught_up.append(1)
        await real_catch_up(*args)

    monkeypatch.setattr(app, "_catch_up", counted)
    async with worker_running(config), gateway_running(config) as (handle, _):
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", handle.port))
        stream = trio.SocketStream(sock)
        body = json.dumps({"model": "scripted", "stream": True, "messages": HI}).encode()
        await stream.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
            + f"authorization: Bearer {token()}\r\ncontent-type: application/json\r\n"
              f"content-length: {len(body)}\r\n\r\n".encode() + body)
        # Read nothing until the vendor has sent the whole answer.
        await wait_calls(llm, lambda calls: calls and calls[-1].finished)
        received = bytearray()
        while chunk := await stream.receive_some(65536):
            received += chunk
        await stream.aclose()
    status, sse = _http_body(bytes(received))
    assert status == 200
    text = "".join(payload["choices"][0]["delta"].get("content") or ""
                   for line in sse.split(b"\n") if line.startswith(b"data: {")
                   for payload in [json.loads(line[6:])] if payload.get("choices"))
    assert text == "".join(words)
    assert sse.rstrip().endswith(b"data: [DONE]")
    assert caught_up  # the case this test is about did happen


def _http_body(raw: bytes) -> tuple[int, bytes]:
    """A whole HTTP/1.1 response's status and body (chunked or not), read by h11."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    client.receive_data(b"")
    status, body = 0, bytearray()
    while (event := client.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    return status, bytes(body)
