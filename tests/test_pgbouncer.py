"""Postgres through PgBouncer in transaction mode (Debian's pgbouncer, a small server
pool in front of the stack's Postgres), with `postgres.prepare_threshold = ""`: the job
lifecycle, budgets and outage tests of the other modules run again here, each in a
database of its own (`stack` below: they ran once already, and budgets and histories
would carry over), their configs pointed at PgBouncer (`make_config`), their
assertions reading Postgres directly."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.adapters.postgres import Postgres
from actors.errors import PermanentError, TransientError
from config import Config, load_config
from messages.ports import Hold
from tests.conftest import Stack, config_text, own_database
from tests.scripted_llm import ScriptedLLM
from tests.test_job_lifecycle import (  # noqa: F401  (collected again, through PgBouncer)
    test_one_session_runs_in_order_and_sessions_run_concurrently,
    test_redelivery_of_a_completed_job_calls_no_model,
    test_sigterm_completes_short_jobs_and_hands_long_ones_back,
)
from tests.test_operations import (  # noqa: F401
    test_concurrent_jobs_at_the_edge_of_a_budget_never_overspend,
    test_requests_per_minute_are_limited_per_window,
)
from tests.test_outages import (  # noqa: F401
    test_postgres_read_only_during_a_failover_is_waited_out,
    test_postgres_restarted_mid_job,
)
from tools import local_stack

pytestmark = pytest.mark.skipif(
    not Path(local_stack.PGBOUNCER).exists(),
    reason="not run: needs Debian's pgbouncer (bin/chat-actors test installs it as root)")


class _Database:
    """The stack's Postgres service, its URL naming this test's database."""

    def __init__(self, service: local_stack.Service, name: str) -> None:
        self._service, self.name = service, name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._service, attribute)

    @property
    def url(self) -> str:
        return self._service.url.rsplit("/", 1)[0] + f"/{self.name}"


class _OwnDatabase:
    """The session's stack, with a database of this test's own."""

    def __init__(self, stack: Stack, name: str) -> None:
        self._stack, self._name = stack, name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._stack, attribute)

    @property
    def postgres(self) -> _Database:
        return _Database(self._stack.postgres, self._name)


@pytest.fixture
def stack(stack: Stack) -> Iterator[Any]:
    with own_database(stack.postgres.url) as name:
        yield _OwnDatabase(stack, name)


@pytest.fixture
def pgbouncer(stack: Any) -> Iterator[local_stack.Service]:
    service = local_stack.start_pgbouncer(stack.workdir, stack.postgres.port)
    yield service
    service.stop()


@pytest.fixture
def make_config(stack: Any, llm: ScriptedLLM, tmp_path: Path,
                pgbouncer: local_stack.Service) -> Callable[..., tuple[Config, Path]]:
    """conftest's configs, with Postgres reached through PgBouncer, never preparing."""

    def make(extra: str = "", tag: str | None = None,
             environ: dict[str, str] | None = None) -> tuple[Config, Path]:
        tag = tag or uuid.uuid4().hex[:10]
        path = tmp_path / f"config-{tag}.toml"
        direct = f'dsn = "{stack.postgres.url}"\n'
        text = config_text(stack, llm.url, tag, extra)
        assert direct in text
        pooled = pgbouncer.url.rsplit("/", 1)[0] + f"/{stack.postgres.name}"
        path.write_text(text.replace(direct, f'dsn = "{pooled}"\nprepare_threshold = ""\n'))
        return load_config(path, environ=environ or {}), path

    return make


MIX_UP = re.compile(r"prepared statement|violates .* constraint|invalid input|bind message")


def reserve_many(store: Postgres) -> list[str]:
    """Claim and reserve a budget for 4 x 15 jobs, four at a time; the errors met."""
    import trio

    errors: list[str] = []

    async def one_after_another(worker: int) -> None:
        for n in range(15):
            job_id = f"pgb-{uuid.uuid4().hex[:8]}-{worker}-{n}"
            try:
                await store.claim(job_id=job_id, user_id="pgb", session_id=f"s{worker}",
                                  trace_id="t", mode="gen", model="m", provider="p",
                                  lease_holder="w", lease_s=30)
                refused = await store.reserve(
                    job_id=job_id, lease_holder="w", period="day",
                    holds=[Hold(scope="user:pgb", kind="requests", amount=1.0, limit=1e9)])
                assert refused is None
            except (PermanentError, TransientError) as exc:
                # "already exists", "does not exist", or a bind that meets another
                # query's statement of the same name (a protocol violation).
                errors.append(str(exc))

    async def run() -> None:
        await store.migrate()
        async with trio.open_nursery() as nursery:
            for worker in range(4):
                nursery.start_soon(one_after_another, worker)

    trio.run(run)
    return errors


def test_prepared_statements_break_behind_pgbouncer_and_the_empty_threshold_fixes_it(
        pgbouncer):
    # The same claims and budget reservations, four connections at once, through a pool
    # of server connections that each transaction may change.
    config = load_config(environ={"CHAT_ACTORS__POSTGRES__DSN": pgbouncer.url})
    assert config.postgres.prepare_after == 5  # psycopg's default
    broken = Postgres.of(config.postgres, pool_size=4)
    try:
        errors = reserve_many(broken)
    finally:
        broken.close()
    assert errors, "no error: PgBouncer did not break prepared statements"
    # Each a prepared statement's mix-up: one missing or already there, or a bind that
    # met another query's statement of the same name and ran it with the wrong values
    # (seen once: the lease holder "w" stored as a ledger row's kind). Never another
    # fault, such as a connection refused.
    assert [e for e in errors if not MIX_UP.search(e)] == []
    fixed = load_config(environ={"CHAT_ACTORS__POSTGRES__DSN": pgbouncer.url,
                                 "CHAT_ACTORS__POSTGRES__PREPARE_THRESHOLD": ""})
    assert fixed.postgres.prepare_after is None
    store = Postgres.of(fixed.postgres, pool_size=4)
    try:
        assert reserve_many(store) == []
    finally:
        store.close()
