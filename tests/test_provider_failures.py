"""Vendor failures through the real clients and the scripted server (contract 6.7).

Every test runs twice: on the native OpenAI-wire path and forced through LiteLLM.
"""

from __future__ import annotations

import pytest

from tests.helpers import events_of, job_row, produce, request, worker_running
from tests.scripted_llm import Reply

BACKUP = """
[llm.models.scripted]
model = "openai/scripted-model"
api_base = "{url}"
api_key_env = "SCRIPTED_LLM_KEY"
fallbacks = ["backup"]
stream_path = "{path}"
{scripted}

[llm.models.backup]
model = "openai/backup-model"
api_base = "{url}"
api_key_env = "SCRIPTED_LLM_KEY"
stream_path = "{path}"
"""


@pytest.fixture(params=["auto", "litellm"])
def stream_path(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_config(make_config, stream_path):
    """The suite's config, with the scripted alias on this test's stream path."""

    def make(extra: str = "", tag: str | None = None, environ: dict[str, str] | None = None):
        return make_config(extra, tag, {
            "CHAT_ACTORS__LLM__MODELS__SCRIPTED__STREAM_PATH": stream_path, **(environ or {})})

    make.stream_path = stream_path
    return make


def with_backup(make_config, llm, retries: int, scripted: str = ""):
    _, path = make_config()
    text = path.read_text()
    # Replace the scripted alias of the base config with one that has a fallback.
    head, _, _ = text.partition("[llm.models.scripted]")
    extra = BACKUP.format(url=llm.url, path=make_config.stream_path, scripted=scripted)
    path.write_text(head + extra + "\n[shutdown]\ngrace_s = 5\n[health]\nport = 0\n")
    from config import load_config

    return load_config(path, environ={"CHAT_ACTORS__LLM__RETRIES": str(retries),
                                      "CHAT_ACTORS__LLM__RETRY_BACKOFF_S": "0.05"})


async def test_a_429_is_retried_and_the_client_is_told(config, llm, rds, stream_path):
    llm.queue(Reply(status=429, headers=(("retry-after", "1"),)))
    llm.default = Reply(tokens=("fine", " now"))
    req = request("hello?")
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["started", "provider"]
    assert events[1]["data"]["from"] == events[1]["data"]["to"] == "scripted"
    assert "RateLimitError" in events[1]["data"]["reason"]
    assert events[-2]["data"]["text"] == "fine now" and len(llm.calls) == 2
    assert llm.calls[1].started_at - llm.calls[0].started_at >= 1  # Retry-After honoured
    agent = {k.lower(): v for k, v in llm.calls[0].headers.items()}["user-agent"]
    assert ("OpenAI" in agent) == (stream_path == "litellm")  # the path this test meant to run


async def test_a_stream_broken_mid_answer_is_continued_by_the_fallback(make_config, llm, rds, db):
    config = with_backup(make_config, llm, retries=0)
    llm.queue(Reply(tokens=("The", " sky", " is", " green"), break_after=2),
              Reply(tokens=(" is", " blue.")))
    req = request("What colour is the sky?")
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    switch = next(e for e in events if e["event"] == "provider")
    assert (switch["data"]["from"], switch["data"]["to"]) == ("scripted", "backup")
    tokens = "".join(e["data"]["text"] for e in events if e["event"] == "token")
    assert tokens == events[-2]["data"]["text"] == "The sky is blue."
    assert events[-2]["data"]["model"] == "backup"
    # The fallback was asked to continue the partial answer, not to start again.
    assert llm.calls[1].body["model"] == "backup-model"
    assert llm.calls[1].messages[-1] == {"role": "assistant", "content": "The sky"}
    row = job_row(db, req["jobId"])
    assert (row["status"], row["model"]) == ("completed", "backup")


async def test_a_permanent_error_fails_fast_with_a_clear_error(make_config, llm, rds, db):
    config = with_backup(make_config, llm, retries=2)
    llm.queue(Reply(status=400, error_body='{"error": {"message": "bad parameter: tools"}}'))
    req = request("hi")
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    assert len(llm.calls) == 1  # no retry, no fallback
    error = events[-2]["data"]
    assert events[-2]["event"] == "error" and error["code"] == "bad_request"
    assert "bad parameter: tools" in error["message"] and error["retryable"] is False
    assert events[-1]["data"] == {"status": "failed", "partial": False}
    assert job_row(db, req["jobId"])["status"] == "failed"


async def test_5xx_on_every_alias_fails_as_retryable(make_config, llm, rds):
    config = with_backup(make_config, llm, retries=1)
    llm.default = Reply(status=503)
    req = request("anyone?")
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    assert len(llm.calls) == 4  # 2 tries on each alias
    assert [e["event"] for e in events].count("provider") == 3
    assert events[-2]["data"]["code"] == "provider_unavailable"
    assert events[-2]["data"]["retryable"] is True
    assert events[-1]["data"]["status"] == "failed"


async def test_a_parameter_the_alias_drops_never_reaches_its_vendor_but_its_fallback_gets_it(
        make_config, llm, rds, db):
    """`drop_params` (issue 36): the vendor behind `scripted` refuses `temperature`; a
    request that sets it is answered, without it, by that alias, and the fallback the
    broken stream moves to (which takes it) gets it again."""
    config = with_backup(make_config, llm, retries=0,
                         scripted='drop_params = ["temperature", "seed"]')
    llm.queue(Reply(tokens=("Warm", " and"), break_after=1), Reply(tokens=(" dry.",)))
    req = request("Weather?", params={"temperature": 0.5, "topP": 0.9})
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
    assert events[-1]["data"]["status"] == "completed"
    first, fallback = llm.calls[0].body, llm.calls[1].body
    assert "temperature" not in first and first["top_p"] == 0.9
    assert fallback["model"] == "backup-model" and fallback["temperature"] == 0.5
    assert (job_row(db, req["jobId"]) or {}).get("model") == "backup"
