"""What goes to the vendor besides the messages counts, and what comes back is bounded
(contract 2.1, 3.1), on the real stack with the scripted vendor: tool schemas count in
the context check and the budget reservation, so a request whose tools alone are too
big never reaches the vendor; a vendor that streams too many tool calls, or too much of
them, fails its job with a named error and the worker goes on."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.helpers import events_of, job_row, message_rows, produce, request, worker_running
from tests.scripted_llm import Reply

ALIAS = "CHAT_ACTORS__LLM__MODELS__SCRIPTED__"
TOOLS_ON = {f"{ALIAS}TOOLS": "true"}
WORDS = ("the account holder may ask for a refund within thirty days of delivery when the "
         "parcel arrives damaged or incomplete, and support answers within two working days")


def big_tool(name: str, fields: int) -> dict[str, Any]:
    """A tool whose schema is about 200 bytes (~35 tokens) per field: under every
    schema limit, yet thousands of tokens in all."""
    return {"name": name, "description": "Files a support case.", "parameters": {
        "type": "object", "properties": {
            f"field_{n}": {"type": "string", "description": f"{n}: {WORDS}"}
            for n in range(fields)}}}


def tokens_of(tools: list[dict[str, Any]]) -> int:
    """What the worker's estimate of these tools is, near enough: 4 bytes a token."""
    return len(json.dumps(tools)) // 4


async def test_tools_over_the_users_tokens_per_minute_never_reach_the_vendor(
        make_config, llm, rds, db):
    """erin may use 20,000 tokens a minute. A question with three 60 KB tool schemas
    (~45,000 tokens) is refused with rate_limited before any vendor call; the same
    question with a small tool runs."""
    config, _ = make_config(extra="[budgets.users.erin]\ntpm = 20000\n",
                            environ={**TOOLS_ON, f"{ALIAS}CONTEXT_WINDOW": "200000"})
    tools = [big_tool(f"case_{n}", 300) for n in range(3)]
    assert all(len(json.dumps(t["parameters"])) < 65_536 for t in tools)
    assert tokens_of(tools) > 40_000
    llm.default = Reply(tokens=("ok",))
    huge = request("Open a case", userId="erin", v=2, tools=tools)
    small = request("Open a case", userId="erin", v=2, tools=[big_tool("case", 2)])
    async with worker_running(config):
        produce(config, huge)
        refused = await events_of(rds, config, huge["jobId"])
        produce(config, small)
        answered = await events_of(rds, config, small["jobId"])
    assert [e["event"] for e in refused] == ["started", "error", "done"]
    error = refused[1]["data"]
    assert error["code"] == "rate_limited" and "user:erin is over its tokens per minute" \
        in error["message"]
    needed = float(error["message"].split("this job needs ")[1].split(",")[0])
    assert needed > 30_000  # the tools, counted
    assert refused[-1]["data"] == {"status": "rejected", "partial": False}
    assert answered[-1]["data"]["status"] == "completed"
    assert len(llm.calls) == 1 and llm.calls[0].body["tools"][0]["function"]["name"] == "case"
    used = db.execute("SELECT sum(used) FROM llm_budget_ledger WHERE scope = 'user:erin' "
                      "AND kind = 'tokens'").fetchone()[0]
    assert float(used) < 20_000  # only the small one's


async def test_tools_that_alone_overflow_the_context_window_are_refused(
        make_config, llm, rds):
    """The scripted alias has a 4,096-token window: tools of ~10,000 tokens do not fit
    whatever the message, so the job fails with context_length and no vendor call."""
    config, _ = make_config(environ=TOOLS_ON)
    assert config.llm.models["scripted"].context_window == 4096
    tools = [big_tool("case", 250)]
    assert tokens_of(tools) > 8_000
    req = request("hi", v=2, tools=tools)
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    assert [e["event"] for e in events] == ["started", "error", "done"]
    error = events[1]["data"]
    assert error["code"] == "context_length" and "with the system prompt and the tools (" \
        in error["message"]
    assert events[-1]["data"]["status"] == "failed"
    assert llm.calls == []


# --- what a vendor's tool calls may hold -------------------------------------------------

def _calls(count: int, argument: str = '{"x": 1}') -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    return tuple((f"call_{n}", "f", (argument,)) for n in range(count))


@pytest.mark.parametrize("stream_path", ["openai", "litellm"])
async def test_a_vendor_that_makes_too_many_tool_calls_fails_the_job_not_the_worker(
        make_config, llm, rds, db, stream_path):
    config, _ = make_config(environ={**TOOLS_ON, f"{ALIAS}STREAM_PATH": stream_path})
    tool = {"name": "f", "parameters": {"type": "object"}}
    llm.queue(Reply(tokens=(), tool_calls=_calls(config.limits.max_tool_calls + 1),
                    finish_reason="tool_calls"),
              Reply(tokens=("after", " it")))
    runaway = request("call f", v=2, tools=[tool])
    after = request("and now?")
    async with worker_running(config):
        produce(config, runaway)
        failed = await events_of(rds, config, runaway["jobId"])
        produce(config, after)
        answered = await events_of(rds, config, after["jobId"])
    assert [e["event"] for e in failed] == ["started", "error", "done"]  # no tool_call kept
    error = failed[1]["data"]
    assert (error["code"], error["retryable"]) == ("tool_calls_too_large", False)
    assert "limits.max_tool_calls (64)" in error["message"]
    assert failed[-1]["data"]["status"] == "failed"
    assert len([c for c in llm.calls if c.body.get("tools")]) == 1  # not retried
    assert answered[-1]["data"]["status"] == "completed"  # the worker went on
    row = job_row(db, runaway["jobId"])
    assert row is not None and row["error"].startswith("tool_calls_too_large: ")
    assert all(not m.get("tool_calls") for m in message_rows(db, runaway["jobId"]))


async def test_a_vendor_whose_tool_calls_are_too_large_fails_the_job(make_config, llm, rds, db):
    config, _ = make_config(environ={**TOOLS_ON,
                                     "CHAT_ACTORS__LIMITS__MAX_TOOL_CALL_CHARS": "10000"})
    tool = {"name": "f", "parameters": {"type": "object"}}
    # Two calls of 6,000 characters each: each within the limit, not both together.
    llm.queue(Reply(tokens=(), tool_calls=_calls(2, json.dumps({"x": "y" * 5990})),
                    finish_reason="tool_calls"))
    runaway = request("call f", v=2, tools=[tool])
    async with worker_running(config):
        produce(config, runaway)
        failed = await events_of(rds, config, runaway["jobId"])
    assert [e["event"] for e in failed] == ["started", "error", "done"]
    assert failed[1]["data"]["code"] == "tool_calls_too_large"
    assert "limits.max_tool_call_chars (10000)" in failed[1]["data"]["message"]
    assert all(not m.get("tool_calls") for m in message_rows(db, runaway["jobId"]))
