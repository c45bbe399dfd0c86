"""Operations (issue 7): /metrics after known jobs, readiness while draining, JSON log
lines with the job's ids and no secret, budget reservations under concurrency, usage."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from actors.adapters.llm.chat import cost_usd
from messages.ports import Rates, TokenCounts
from tests.helpers import (
    ROOT,
    events_of,
    job_row,
    produce,
    readyz,
    request,
    stop_process,
    until,
    wait_calls,
    worker_running,
)
from tests.many_workers import launch_worker
from tests.scripted_llm import Reply


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["content-type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(metrics, name: str, **labels: str) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


async def scraped_when(port: int, predicate, timeout_s: float = 20.0):
    """Scrape (from a thread: the worker serves /metrics on this Trio loop) until it holds."""
    with trio.fail_after(timeout_s):
        while not predicate(metrics := await trio.to_thread.run_sync(scrape, port)):  # noqa: ASYNC110
            await trio.sleep(0.05)
    return metrics


async def test_metrics_count_known_jobs(config, llm, rds, db):
    priced = request("priced", model="priced")
    retried = request("retried", model="priced")
    refused = request("refused", model="priced")
    async with worker_running(config) as worker:
        llm.queue(Reply(tokens=("a", "b", "c"), prompt_tokens=7))
        produce(config, priced)
        await events_of(rds, config, priced["jobId"])
        llm.queue(Reply(status=429, headers=(("retry-after", "0.01"),)),
                  Reply(tokens=("d", "e", "f"), prompt_tokens=7))
        produce(config, retried)
        retried_events = await events_of(rds, config, retried["jobId"])
        llm.queue(Reply(status=401, error_body='{"error": {"message": "bad key"}}'))
        produce(config, refused)
        await events_of(rds, config, refused["jobId"])
        produce(config, b"{not json")
        # Lag is measured every few seconds, once the partitions are assigned.
        metrics = await scraped_when(worker.health_port, lambda m: sample(
            m, "chat_actors_rejections_total", reason="bad_input") == 1 and any(
            name == "chat_actors_consumer_lag" for name, _ in m))

    assert sample(metrics, "chat_actors_jobs_total", status="completed", mode="gen") == 2
    assert sample(metrics, "chat_actors_jobs_total", status="failed", mode="gen") == 1
    assert sample(metrics, "chat_actors_tokens_total", direction="prompt", model="priced") == 14
    assert sample(metrics, "chat_actors_tokens_total", direction="completion", model="priced") == 6
    expected = 2 * cost_usd("openai/gpt-4o-mini", TokenCounts(prompt=7, completion=3), Rates())
    assert sample(metrics, "chat_actors_cost_usd_total", model="priced") == pytest.approx(expected)
    assert sample(metrics, "chat_actors_ttft_seconds_count", model="priced") == 2
    assert sample(metrics, "chat_actors_job_latency_seconds_count", model="priced") == 3
    assert sample(metrics, "chat_actors_provider_errors_total", vendor="openai",
                  kind="rate_limit") == 1
    assert sample(metrics, "chat_actors_provider_errors_total", vendor="openai", kind="auth") == 1
    assert sample(metrics, "chat_actors_provider_retries_total", vendor="openai") == 1
    assert sample(metrics, "chat_actors_jobs_in_flight") == 0
    assert sample(metrics, "chat_actors_mailbox_depth", mailbox="redis_sink") == 0
    lags = [v for (name, _), v in metrics.items() if name == "chat_actors_consumer_lag"]
    assert lags and all(v == 0 for v in lags)
    final = retried_events[-2]["data"]
    assert (final["provider"], final["retries"]) == ("openai", 1) and "fallbacks" not in final
    row = job_row(db, retried["jobId"])
    assert (row["retries"], row["fallbacks"], row["provider"]) == (1, 0, "openai")
    assert float(row["cost_usd"]) == pytest.approx(expected / 2)


async def test_readiness_turns_off_while_draining(make_config, llm, rds):
    config, _ = make_config()
    llm.default = Reply(tokens=tuple(f"{i} " for i in range(40)), token_delay_s=0.05)
    req = request("a long one")
    async with worker_running(config) as worker:
        assert (await readyz(worker.health_port))[0] == 200
        produce(config, req)
        await wait_calls(llm, lambda calls: calls and calls[0].tokens_sent >= 2, 30)
        worker.stop.set()
        await until(lambda: worker.health.draining)
        status, report = await readyz(worker.health_port)
        assert status == 503 and report["draining"] is True
    events = await events_of(rds, config, req["jobId"])
    assert events[-1]["data"]["status"] == "completed"  # drained, not dropped


SECRET = "sk-test-SECRET-9f8e7d6c"


async def test_log_lines_are_json_with_the_job_ids_and_never_a_secret(
        make_config, llm, rds, tmp_path):
    config, path = make_config()
    log = tmp_path / "worker.log"
    # The vendor echoes the key back in its errors (as OpenAI's 401 does), on every try.
    echo = json.dumps({"error": {"message": f"overloaded; your key was {SECRET}"}})
    llm.queue(*[Reply(status=503, error_body=echo)] * (config.llm.retries + 1))
    failing, ok = request("first"), request("second", traceId="4bf92f3577b34da6a3ce929d0e0e4736")
    worker = launch_worker(path, log, SCRIPTED_LLM_KEY=SECRET)
    try:
        produce(config, failing)
        failed_events = await events_of(rds, config, failing["jobId"], timeout_s=60)
        produce(config, ok)
        await events_of(rds, config, ok["jobId"])
        worker.terminate()  # drains: the job's last line is written before it exits
        await trio.to_thread.run_sync(worker.wait, 30)
    finally:
        await trio.to_thread.run_sync(stop_process, worker)
    headers = {k.lower(): v for k, v in llm.calls[0].headers.items()}
    assert headers["authorization"] == f"Bearer {SECRET}"  # the key was really in play
    text = log.read_text()
    assert SECRET not in text
    assert SECRET not in json.dumps(failed_events)  # nor in the client's events
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line JSON
    assert all({"event", "level", "timestamp", "logger"} <= set(line) for line in lines)
    mine = [line for line in lines if line.get("job_id") == ok["jobId"]]
    assert any("completed" in line["event"] for line in mine)
    assert all((line["user_id"], line["session_id"], line["trace_id"]) ==
               (ok["userId"], ok["sessionId"], ok["traceId"]) for line in mine)
    refused = [line for line in lines if line.get("job_id") == failing["jobId"]]
    assert any("[redacted]" in line["event"] for line in refused)


METERED = """
[llm.models.metered]
model = "openai/metered-model"
api_base = "{url}"
context_window = 4096
max_tokens = 10
input_cost_per_token = 0.0
output_cost_per_token = 0.001

[budgets.users.carol]
usd = 0.05

[budgets.users.dave]
rpm = 3
"""


async def test_concurrent_jobs_at_the_edge_of_a_budget_never_overspend(make_config, llm, rds, db):
    config, path = make_config(extra=METERED.format(url=llm.url))
    # Each job's worst case is 10 answer tokens at $0.001 = $0.01, and it uses exactly that:
    # a $0.05 budget admits five of twenty concurrent jobs, whatever the interleaving.
    llm.default = Reply(tokens=tuple(f"t{i} " for i in range(10)), token_delay_s=0.02)
    jobs = [request(f"job {i}", userId="carol", model="metered") for i in range(20)]
    async with worker_running(config):
        produce(config, *jobs)
        streams = [await events_of(rds, config, j["jobId"]) for j in jobs]
    statuses = [s[-1]["data"]["status"] for s in streams]
    assert statuses.count("completed") == 5 and statuses.count("rejected") == 15
    assert len(llm.calls) == 5  # a refused job never reached the vendor
    refused = next(s for s in streams if s[-1]["data"]["status"] == "rejected")
    assert refused[-2]["event"] == "error" and refused[-2]["data"]["code"] == "budget_exceeded"
    assert "user:carol is over its USD budget per month" in refused[-2]["data"]["message"]
    spent = db.execute("SELECT sum(cost_usd) FROM llm_jobs WHERE job_id = ANY(%s) "
                       "AND status = 'completed'", ([j["jobId"] for j in jobs],)).fetchone()[0]
    assert float(spent) == pytest.approx(0.05) and float(spent) <= 0.05 + 1e-12
    used, reserved = db.execute("SELECT used, reserved FROM llm_budget_ledger "
                                "WHERE scope = 'user:carol' AND kind = 'usd'").fetchone()
    assert (float(used), float(reserved)) == (pytest.approx(0.05), 0.0)  # all settled

    # `usage` reads the same rows: carol's five jobs and their cost.
    out = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-m", "tools.cli", "usage", "--config", str(path), "--user", "carol",
         "--since", "1h"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}))
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    assert rows[0][:2] == ["user", "model"]
    carol = [r for r in rows if r[0] == "carol"]
    assert len(carol) == 1 and carol[0][1:3] == ["metered", "5"]
    assert carol[0][6:] == ["50", "0", "0.050000"]  # completion, reasoning tokens, cost
    assert rows[-1][0] == "total"


async def test_requests_per_minute_are_limited_per_window(make_config, llm, rds, db):
    config, _ = make_config(extra=METERED.format(url=llm.url))
    llm.default = Reply(tokens=("ok",))
    jobs = [request(f"job {i}", userId="dave", model="metered") for i in range(8)]
    async with worker_running(config):
        produce(config, *jobs)
        streams = [await events_of(rds, config, j["jobId"]) for j in jobs]
    completed = [s for s in streams if s[-1]["data"]["status"] == "completed"]
    limited = [s for s in streams if s[-1]["data"]["status"] == "rejected"]
    assert len(completed) + len(limited) == 8 and limited
    assert all(s[-2]["data"]["code"] == "rate_limited" and s[-2]["data"]["retryable"]
               for s in limited)
    windows = db.execute("SELECT used FROM llm_budget_ledger WHERE scope = 'user:dave' "
                         "AND kind = 'requests'").fetchall()
    # At most 3 per minute window (the jobs may straddle a minute boundary).
    assert all(float(used) <= 3 for (used,) in windows)
    assert sum(float(used) for (used,) in windows) == len(completed) == len(llm.calls)


async def test_consumer_lag_shows_requests_waiting_behind_a_full_worker(make_config, llm, rds):
    config, _ = make_config(environ={"CHAT_ACTORS__JOBS__MAX_IN_FLIGHT": "1"})
    # The first job streams for 8 s: longer than the 5 s between lag measurements.
    llm.queue(Reply(tokens=tuple(f"{i} " for i in range(80)), token_delay_s=0.1))
    llm.default = Reply(tokens=("short",))
    jobs = [request(f"queued {i}") for i in range(5)]
    async with worker_running(config) as worker:
        produce(config, *jobs)
        # One job runs; the intake pauses; the other four wait in Kafka, unconsumed.
        metrics = await scraped_when(worker.health_port, lambda m: sum(
            v for (name, _), v in m.items() if name == "chat_actors_consumer_lag") >= 3)
        assert sample(metrics, "chat_actors_jobs_in_flight") == 1
        for job in jobs:
            await events_of(rds, config, job["jobId"])
        metrics = await scraped_when(worker.health_port, lambda m: sum(
            v for (name, _), v in m.items() if name == "chat_actors_consumer_lag") == 0)
    assert sample(metrics, "chat_actors_jobs_total", status="completed", mode="gen") == 5
