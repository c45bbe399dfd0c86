"""OpenAI's API on the gateway (docs/contract.md 7.2) through clients nobody here wrote:
the official `openai` npm package and the Vercel AI SDK (`streamText` over
`@ai-sdk/openai`'s chat model), run by Node.js from tests/clients; LangChain's
`ChatOpenAI`; and, with those, the official `openai` Python SDK while the worker
answering it is SIGKILLed mid-answer. Each goes through the gateway to a worker and the
scripted vendor, on the real stack.

The clients block (a Node.js process, a synchronous SDK), so each runs in a thread
while the gateway and the worker run on the test's Trio loop.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from tests.helpers import (
    JWT_SECRET,
    gateway_running,
    stop_process,
    until,
    worker_running,
)
from tests.many_workers import launch_worker
from tests.node_clients import node_client, node_installed
from tests.scripted_llm import Reply
from tests.test_gateway import token

WEATHER = (("call_1", "weather", ('{"city"', ': "Oslo"}')),
           ("call_2", "weather", ('{"city": "Rome"}',)))


def base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1"


def job(port: int, user: str = "alice", **fields: Any) -> dict[str, Any]:
    """A job for tests/clients/*.mjs: the gateway, a token, one user message."""
    return {"baseURL": base_url(port), "apiKey": token(user), "model": "scripted",
            "messages": [{"role": "user", "content": "Hi"}], **fields}


async def in_thread(fn: Callable[[], Any]) -> Any:
    # Abandoned on cancel: a failing test does not wait for a client stuck on its socket.
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


@pytest.fixture
def needs_node() -> None:
    """Skips the test, saying why, without Node.js. A fixture, not a call in the test:
    pytest-trio loses the reason of a skip raised inside a Trio test."""
    node_installed()


async def node(script: str, job: dict[str, Any]) -> dict[str, Any]:
    return await in_thread(lambda: node_client(script, job))


# --- the official openai package (npm) ------------------------------------------------


@pytest.mark.usefixtures("needs_node")
async def test_the_openai_npm_package_lists_streams_answers_and_refuses(gw_config, llm):
    config = gw_config(CHAT_ACTORS__LLM__MODELS__SCRIPTED__TOOLS="true")
    async with worker_running(config), gateway_running(config) as (handle, _):
        port = handle.port
        listed = await node("openai_chat.mjs", {"op": "models", "baseURL": base_url(port),
                                                "apiKey": token()})

        llm.queue(Reply(tokens=("Node", " streams", " this.")))
        streamed = await node("openai_chat.mjs", job(
            port, stream=True, extra={"stream_options": {"include_usage": True}}))

        llm.queue(Reply(tokens=("Whole", " answer.")))
        whole = await node("openai_chat.mjs", job(port, stream=False))

        unknown = await node("openai_chat.mjs", job(port, model="gpt-nonexistent", stream=True))
        forged = await node("openai_chat.mjs", {**job(port, stream=True), "apiKey": "nope"})

        llm.queue(Reply(tokens=(), finish_reason="tool_calls", tool_calls=WEATHER))
        tools = [{"type": "function", "function": {
            "name": "weather", "parameters": {"type": "object",
                                              "properties": {"city": {"type": "string"}}}}}]
        called = await node("openai_chat.mjs", job(port, stream=True, extra={"tools": tools}))

    assert listed["ok"] and sorted(listed["ids"]) == sorted(config.llm.models), listed
    assert {m["owned_by"] for m in listed["models"]} == {"chat-actors"}

    assert streamed["ok"], streamed
    assert streamed["text"] == "Node streams this."
    assert streamed["role"] == "assistant" and streamed["finish_reason"] == "stop"
    assert set(streamed["models"]) == {"scripted"} and len(streamed["ids"]) == 1
    usage = streamed["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3 and usage["prompt_tokens"] > 0

    assert whole["ok"], whole
    assert (whole["text"], whole["finish_reason"], whole["model"]) == (
        "Whole answer.", "stop", "scripted")
    assert whole["id"].startswith("chatcmpl-") and whole["usage"]["completion_tokens"] == 2

    assert not unknown["ok"] and unknown["text"] == "", unknown
    assert (unknown["error"]["class"], unknown["error"]["status"], unknown["error"]["code"],
            unknown["error"]["param"]) == ("NotFoundError", 404, "model_not_found", "model")
    assert unknown["error"]["x_should_retry"] == "false"
    assert not forged["ok"] and forged["text"] == "", forged
    assert (forged["error"]["class"], forged["error"]["status"]) == ("AuthenticationError", 401)

    assert called["ok"], called
    assert called["finish_reason"] == "tool_calls" and called["text"] == ""
    assert called["tool_calls"] == [
        {"index": 0, "id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
        {"index": 1, "id": "call_2", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]
    # Only the three answers reached the vendor (the refusals never did), the last with
    # the client's tool.
    assert ["tools" in c.body for c in llm.calls] == [False, False, True]
    assert llm.calls[-1].body["tools"][0]["function"]["name"] == "weather"


# --- the Vercel AI SDK ----------------------------------------------------------------


@pytest.mark.usefixtures("needs_node")
async def test_the_ai_sdk_streams_text_usage_and_tool_calls_and_gets_each_status(gw_config,
                                                                                 llm):
    config = gw_config(CHAT_ACTORS__LLM__MODELS__SCRIPTED__TOOLS="true")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Count to three"}]
    async with worker_running(config), gateway_running(config) as (handle, _):
        port = handle.port
        llm.queue(Reply(tokens=("One,", " two,", " three."), token_delay_s=0.05))
        streamed = await node("ai_sdk_stream.mjs", job(port, messages=messages))

        unknown = await node("ai_sdk_stream.mjs", job(port, model="gpt-nonexistent"))
        forged = await node("ai_sdk_stream.mjs", {**job(port), "apiKey": "nope"})

        llm.queue(Reply(tokens=(), finish_reason="tool_calls", tool_calls=WEATHER))
        # No inputSchema: the SDK sends an empty object schema and checks nothing.
        called = await node("ai_sdk_stream.mjs", job(port, extra={
            "tools": {"weather": {"description": "The weather in a city"}}}))

    assert streamed["ok"], streamed
    assert streamed["text"] == "One, two, three." and len(streamed["parts"]) > 1
    assert (streamed["finish_reason"], streamed["raw_finish_reason"]) == ("stop", "stop")
    assert streamed["response_model"] == "scripted"
    # The SDK always asks include_usage: the usage chunk came, with the vendor's counts.
    usage = streamed["usage"]
    assert usage["outputTokens"] == 3 and usage["inputTokens"] > 0
    assert usage["totalTokens"] == usage["inputTokens"] + 3
    vendor = llm.calls[0].messages
    assert [(m["role"], m["content"]) for m in vendor] == [
        ("system", "Be brief."), ("user", "Count to three")]

    for refused, status in ((unknown, 404), (forged, 401)):
        assert not refused["ok"] and refused["text"] == "", refused
        error = refused["errors"][0]
        assert (error["class"], error["status"], error["is_retryable"]) == (
            "APICallError", status, False), refused
    assert "model_not_found" in unknown["errors"][0]["response_body"]

    assert called["ok"], called
    assert called["finish_reason"] == "tool-calls" and called["text"] == ""
    assert called["tool_calls"] == [
        {"id": "call_1", "name": "weather", "input": {"city": "Oslo"}},
        {"id": "call_2", "name": "weather", "input": {"city": "Rome"}}]
    assert llm.calls[-1].body["tools"][0]["function"]["name"] == "weather"


# --- LangChain --------------------------------------------------------------------------


def chat_model(port: int, user: str, model: str = "scripted", **kwargs: Any) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=base_url(port), api_key=SecretStr(token(user)),
                      max_retries=0, streaming=True, timeout=60, **kwargs)


def stream_chunks(chat: ChatOpenAI, text: str) -> list[AIMessageChunk]:
    # (LangChain keeps one client per base URL for the process: it is not closed here)
    return list(chat.stream([SystemMessage("Be brief."), HumanMessage(text)]))


def summed(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


async def test_langchain_chat_openai_streams_the_exact_answer_and_its_usage(gw_config, llm):
    config = gw_config()
    async with worker_running(config), gateway_running(config) as (handle, _):
        # Apart in time, so the worker sends them as tokens of their own.
        llm.queue(Reply(tokens=("Lang", "Chain", " streams", " it."), token_delay_s=0.05))
        counted = await in_thread(lambda: stream_chunks(
            chat_model(handle.port, "lc-user", stream_usage=True), "Stream it"))
        llm.queue(Reply(tokens=("No", " usage.")))
        uncounted = await in_thread(lambda: stream_chunks(
            chat_model(handle.port, "lc-user", stream_usage=False), "Again"))

    assert len([c for c in counted if c.content]) > 1  # streamed, not one whole message
    total = summed(counted)
    assert total.content == "LangChain streams it."
    assert total.response_metadata["finish_reason"] == "stop"
    assert total.usage_metadata is not None, "stream_usage=True, yet no usage chunk"
    assert total.usage_metadata["output_tokens"] == 4
    assert total.usage_metadata["total_tokens"] == total.usage_metadata["input_tokens"] + 4
    assert llm.calls[0].messages[-1] == {"role": "user", "content": "Stream it"}

    assert summed(uncounted).content == "No usage."
    assert summed(uncounted).usage_metadata is None  # not asked: no usage chunk sent


# --- a worker SIGKILLed mid-answer while each client streams ---------------------------

TOKENS = tuple(f"w{i} " for i in range(40))
FULL = "".join(TOKENS)
SHOWN = "".join(TOKENS[:5])  # each answer's start, in its job's stream before the kill
# "scripted" takes the answer so far as a prefill and continues it; "priced"
# (openai/gpt-4o-mini) cannot, so its answer starts over as a new attempt.
CONTINUES = {"scripted": True, "priced": False}


@dataclass(frozen=True)
class Ended:
    """What a client ended with: the answer text it assembled and the code of the API
    error it raised (None: the answer ended normally)."""

    text: str
    error: str | None


def python_sdk(port: int, user: str, model: str, received: Callable[[], None]) -> Ended:
    text = ""
    with openai.OpenAI(base_url=base_url(port), api_key=token(user), max_retries=0,
                       timeout=60) as client:
        try:
            for chunk in client.chat.completions.create(
                    model=model, stream=True, messages=[{"role": "user", "content": "Go on"}]):
                if chunk.choices and chunk.choices[0].delta.content:
                    if not text:
                        received()
                    text += chunk.choices[0].delta.content
        except openai.APIError as error:
            return Ended(text, error.code)
    return Ended(text, None)


def langchain(port: int, user: str, model: str, received: Callable[[], None]) -> Ended:
    text = ""
    chat = chat_model(port, user, model)
    try:
        for chunk in chat.stream([HumanMessage("Go on")]):
            if chunk.content:
                if not text:
                    received()
                text += str(chunk.content)
    except openai.APIError as error:
        return Ended(text, error.code)
    return Ended(text, None)


def node_openai(port: int, user: str, model: str, received: Callable[[], None]) -> Ended:
    result = node_client("openai_chat.mjs", job(port, user, model=model, stream=True),
                         timeout=120)
    return Ended(result["text"], None if result["ok"] else result["error"]["code"])


def ai_sdk(port: int, user: str, model: str, received: Callable[[], None]) -> Ended:
    result = node_client("ai_sdk_stream.mjs", job(port, user, model=model), timeout=120)
    if result["ok"]:
        return Ended(result["text"], None)
    # The SDK hands a mid-stream error line to onError as it came; the script reports
    # its message (the code is not among what it prints).
    messages = [e["message"] for e in result["errors"]]
    restarted = any("restarted" in m for m in messages)
    return Ended(result["text"], "answer_restarted" if restarted else repr(result["errors"]))


Client = Callable[[int, str, str, Callable[[], None]], Ended]


async def _killed_mid_answer(clients: dict[str, Client], make_config, monkeypatch, llm, rds,
                             db, tmp_path: Path) -> dict[tuple[str, str], Ended]:
    """Each client streams an answer of each alias in CONTINUES, all from one worker
    process; once every answer's first chunks are in its job's stream (and each Python
    client has text) the worker is SIGKILLed, and a second worker takes the jobs over
    (leases of 2 s). What each client ended with, by (client, alias)."""
    monkeypatch.setenv("CHAT_ACTORS_JWT_SECRET", JWT_SECRET)
    config, path = make_config(extra="[jobs]\nlease_s = 2\n", environ={
        "CHAT_ACTORS__GATEWAY__PORT": "0", "CHAT_ACTORS__GATEWAY__HOST": "127.0.0.1"})
    runs = [(name, alias) for name in clients for alias in CONTINUES]
    # Every first attempt would take 12 s: the kill, a few tokens in, finds each
    # mid-answer. Every later call streams the rest (continuing a prefill when it is
    # given one).
    llm.queue(*[Reply(tokens=TOKENS, token_delay_s=0.3) for _ in runs])
    llm.default = Reply(tokens=TOKENS, token_delay_s=0.02, continues=True)
    users = {run: f"{run[0]}-{run[1]}-{uuid.uuid4().hex[:8]}" for run in runs}
    received = {run: trio.Event() for run in runs}
    ended: dict[tuple[str, str], Ended] = {}

    def jobs() -> dict[str, str]:
        return dict(db.execute("SELECT user_id, job_id FROM llm_jobs WHERE user_id = ANY(%s)",
                               (list(users.values()),)).fetchall())

    def shown() -> bool:
        """Every job's stream holds the answer's start."""
        found = jobs()
        return len(found) == len(runs) and all(
            "".join(json.loads(f["data"])["text"] for _, f in rds.xrange(
                config.job_keys(job_id).stream) if f["event"] == "token").startswith(SHOWN)
            for job_id in found.values())

    async def run(name: str, alias: str) -> None:
        def signal() -> None:
            trio.from_thread.run_sync(received[name, alias].set)

        ended[name, alias] = await in_thread(
            lambda: clients[name](handle.port, users[name, alias], alias, signal))

    log = tmp_path / "worker.log"
    async with gateway_running(config) as (handle, _), trio.open_nursery() as nursery:
        process = launch_worker(path, log)
        try:
            await until(lambda: b" ready: " in log.read_bytes(), 60)
            for name, alias in runs:
                nursery.start_soon(run, name, alias)
            await until(shown, 60)
            for (name, _), event in received.items():
                if clients[name] in (python_sdk, langchain):  # they tell what they got
                    with trio.fail_after(30):
                        await event.wait()
        finally:
            stop_process(process)  # SIGKILL
        assert len(llm.calls) == len(runs) and not any(c.finished for c in llm.calls)
        async with worker_running(config):
            await until(lambda: len(ended) == len(runs), 90)
            # Every job still completes (a client told of a restart has hung up).
            await until(lambda: {row[0] for row in db.execute(
                "SELECT status FROM llm_jobs WHERE user_id = ANY(%s)",
                (list(users.values()),)).fetchall()} == {"completed"}, 60)
    # The second attempts: a prefill continued for "scripted", a fresh start for "priced".
    seconds = llm.calls[len(runs):]
    assert sorted((c.body["model"], c.messages[-1]["role"]) for c in seconds) == sorted(
        [("scripted-model", "assistant"), ("gpt-4o-mini", "user")] * len(clients))
    return ended


def check_ended(ended: dict[tuple[str, str], Ended]) -> None:
    """A continued answer reaches every client whole, each character once; an answer
    that started over ends each client's stream with the explicit error, after only
    text of the answer: never silently different text."""
    for (name, alias), got in ended.items():
        if CONTINUES[alias]:
            assert got == Ended(FULL, None), (name, alias, got)
        else:
            assert got.error == "answer_restarted", (name, alias, got)
            assert got.text and FULL.startswith(got.text) and got.text != FULL, (name, got)


async def test_python_clients_end_whole_or_told_when_their_worker_is_sigkilled(
        make_config, monkeypatch, llm, rds, db, tmp_path):
    ended = await _killed_mid_answer({"openai": python_sdk, "langchain": langchain},
                                     make_config, monkeypatch, llm, rds, db, tmp_path)
    check_ended(ended)


@pytest.mark.usefixtures("needs_node")
async def test_node_clients_end_whole_or_told_when_their_worker_is_sigkilled(
        make_config, monkeypatch, llm, rds, db, tmp_path):
    ended = await _killed_mid_answer({"openai-npm": node_openai, "ai-sdk": ai_sdk},
                                     make_config, monkeypatch, llm, rds, db, tmp_path)
    check_ended(ended)
