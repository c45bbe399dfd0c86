"""The budget ledger in Postgres (contract 4): holds never leak across attempts,
windows are UTC whatever a session's TimeZone, old windows are pruned."""

from __future__ import annotations

import uuid
from urllib.parse import quote

import msgspec
import pytest

from actors.adapters.postgres import Postgres
from messages.mailboxes import JobRejected
from messages.ports import Claimed, Hold
from tests.test_pg_sink import finished


def _scope() -> str:
    return f"user:ledger-{uuid.uuid4().hex[:8]}"


def _ledger(db, scope: str) -> list[tuple[str, float, float]]:
    return [(kind, float(reserved), float(used)) for kind, reserved, used in db.execute(
        "SELECT kind, reserved, used FROM llm_budget_ledger WHERE scope = %s ORDER BY kind",
        (scope,))]


async def _claim(store: Postgres, job_id: str, holder: str) -> int:
    claimed = await store.claim(job_id=job_id, user_id="u", session_id="s", trace_id="t",
                                mode="gen", model="local", provider="openai",
                                lease_holder=holder, lease_s=30)
    assert isinstance(claimed, Claimed)
    return claimed.attempt


async def test_an_attempt_that_ends_before_reserving_gives_back_the_earlier_holds(stack, db):
    """Attempt 1 reserved, then lost its lease; attempt 2 ends before it reserves (an
    early cancel, a refusal, a timeout). Its terminal row must give attempt 1's hold
    back, and so must a failed claim's row."""
    store = Postgres(dsn=stack.postgres.url, pool_size=2)
    await store.migrate()
    scope = _scope()
    holds = [Hold(scope=scope, kind="usd", amount=0.25, limit=10.0),
             Hold(scope=scope, kind="requests", amount=1, limit=100)]
    cancelled_id, failed_id = f"hold-{uuid.uuid4().hex[:8]}", f"hold-{uuid.uuid4().hex[:8]}"
    for job_id in (cancelled_id, failed_id):
        assert await _claim(store, job_id, "w1") == 1
        assert await store.reserve(job_id=job_id, lease_holder="w1", holds=holds,
                                   period="month") is None
        db.execute("UPDATE llm_jobs SET lease_until = now() - interval '1 s' "
                   "WHERE job_id = %s", (job_id,))
    assert _ledger(db, scope) == [("requests", 2.0, 0.0), ("usd", 0.5, 0.0)]

    assert await _claim(store, cancelled_id, "w2") == 2
    cancelled = msgspec.structs.replace(finished(cancelled_id, ""), status="cancelled",
                                        attempt=2, reserved=False)
    assert await store.write_records([cancelled], "w2") == set()
    assert _ledger(db, scope) == [("requests", 1.0, 0.0), ("usd", 0.25, 0.0)]

    failed = JobRejected(job_id=failed_id, user_id="u", session_id="s", status="failed",
                         error="internal: a claim that failed")
    assert await store.write_records([failed], "w2") == set()
    assert _ledger(db, scope) == [("requests", 0.0, 0.0), ("usd", 0.0, 0.0)]
    store.close()


@pytest.mark.parametrize("period", ["day", "month"])
async def test_windows_are_utc_whatever_the_sessions_time_zone(stack, db, period):
    """Two workers whose sessions run in different time zones (PGTZ, or the server's
    default) must count a user's spending in the same window."""
    scope = _scope()
    stores = []
    for zone in ("Asia/Kolkata", "America/New_York"):
        separator = "&" if "?" in stack.postgres.url else "?"
        dsn = f"{stack.postgres.url}{separator}options={quote(f'-c TimeZone={zone}')}"
        stores.append(Postgres(dsn=dsn, pool_size=1))
    await stores[0].migrate()
    for n, store in enumerate(stores):
        job_id = f"utc-{uuid.uuid4().hex[:8]}"
        await _claim(store, job_id, f"w{n}")
        assert await store.reserve(job_id=job_id, lease_holder=f"w{n}", period=period,
                                   holds=[Hold(scope=scope, kind="usd", amount=1, limit=10)]) \
            is None
    rows = db.execute("SELECT window_start = date_trunc(%s, now(), 'UTC'), reserved "
                      "FROM llm_budget_ledger WHERE scope = %s", (period, scope)).fetchall()
    assert [(same, float(reserved)) for same, reserved in rows] == [(True, 2.0)]
    for store in stores:
        store.close()


async def test_old_windows_are_pruned(stack, db):
    store = Postgres(dsn=stack.postgres.url, pool_size=1)
    await store.migrate()
    scope = _scope()
    windows = {
        ("requests", "now() - interval '2 hours'"): False,
        ("requests", "date_trunc('minute', now(), 'UTC') - interval '10 minutes'"): True,
        ("usd", "date_trunc('month', now(), 'UTC') - interval '2 months'"): False,
        ("usd", "date_trunc('month', now(), 'UTC') - interval '1 month'"): True,
        ("usd", "date_trunc('month', now(), 'UTC')"): True,
    }
    for kind, start in windows:
        db.execute(f"INSERT INTO llm_budget_ledger (scope, kind, window_start) "
                   f"VALUES (%s, %s, {start})", (scope, kind))
    assert await store.prune_ledger(period="month") >= 2
    kept = db.execute("SELECT count(*) FROM llm_budget_ledger WHERE scope = %s",
                      (scope,)).fetchone()
    assert kept == (sum(windows.values()),)
    store.close()
