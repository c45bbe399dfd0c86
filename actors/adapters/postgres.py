"""Postgres behind our ports: psycopg (sync) connections used from worker threads.

Request/reply queries (claim a job, read history) go through a small pool;
the pg sink writes its batches in one transaction each (group commit).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from importlib import resources
from typing import Any, LiteralString, TypedDict, TypeVar, cast

import msgspec
import psycopg
import trio
from psycopg import sql
from psycopg.types.json import Jsonb

from actors.errors import PermanentError, TransientError
from config import Postgres as PostgresConfig
from messages.mailboxes import CallMade, ImageRef, JobFinished, JobRejected, Turn
from messages.ports import (
    AlreadyTerminal,
    Claimed,
    ClaimOrder,
    ClaimResult,
    Handed,
    Hold,
    LeasedElsewhere,
    OwnedByAnotherUser,
    Refused,
    UsageRow,
)

T = TypeVar("T")
log = logging.getLogger("chat_actors.postgres")
_TERMINAL = ("completed", "cancelled", "timeout", "failed", "rejected")
# Any key: serialises concurrent migrators of one database.
_MIGRATION_LOCK = 0x63686174
# An API key's fixed prefix (the gateway tells a key from a JWT by it; secret scanners
# find keys by it).
API_KEY_PREFIX = "cak_"


def redact(dsn: str) -> str:
    """The DSN as it may be logged: no password."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", re.sub(r"password=\S+", "password=***", dsn))


# Retried: the server is away or passing through a state (shutting down, too many
# connections, a standby that is read-only during a failover, a lock or serialization
# conflict). OperationalError covers the connection-level ones (admin shutdown,
# cannot connect now, too many connections).
_PASSING = (psycopg.OperationalError, psycopg.errors.SerializationFailure,
            psycopg.errors.DeadlockDetected, psycopg.errors.ReadOnlySqlTransaction,
            psycopg.errors.LockNotAvailable,
            # This process stalled mid-transaction and the server ended it: try again.
            psycopg.errors.IdleInTransactionSessionTimeout)


def _translate(exc: psycopg.Error) -> TransientError | PermanentError:
    # libpq's messages span lines ("...refused\n\tIs the server running..."): one line.
    text = f"postgres: {type(exc).__name__}: {' '.join(str(exc).split())}"
    if isinstance(exc, _PASSING):
        return TransientError(text)
    return PermanentError(text, code="postgres")


class _OverLimit(Exception):
    def __init__(self, refused: Refused) -> None:
        self.refused = refused


# The window a reservation counts in: rates per minute, money per configured period.
# In UTC whatever the session's TimeZone, so every worker counts in the same windows.
_WINDOWS: dict[str, LiteralString] = {"minute": "date_trunc('minute', now(), 'UTC')",
                                       "day": "date_trunc('day', now(), 'UTC')",
                                       "month": "date_trunc('month', now(), 'UTC')"}
_ACTUAL = {"usd": lambda r: r.cost_usd or 0.0, "requests": lambda r: 1,
           "tokens": lambda r: r.prompt_tokens + r.completion_tokens}


# The claim of a batch: rows in job id order (the lock order), each row's status before
# the statement (a rejected request's id is taken over), its attempt after.
_CLAIM_MANY: LiteralString = """
WITH input AS (
    SELECT * FROM unnest(%(ids)s::text[], %(users)s::text[], %(sessions)s::text[],
                         %(traces)s::text[], %(modes)s::text[], %(models)s::text[],
                         %(providers)s::text[], %(keys)s::text[], %(end_users)s::text[],
                         %(metadata)s::jsonb[])
        AS t(job_id, user_id, session_id, trace_id, mode, model, provider, api_key_id,
             end_user, metadata)
), before AS (
    SELECT job_id, status FROM llm_jobs WHERE job_id = ANY(%(ids)s::text[])
)
INSERT INTO llm_jobs AS j (job_id, user_id, session_id, trace_id, mode, model, provider,
                           status, attempt, lease_owner, lease_until, started_at,
                           api_key_id, end_user, metadata)
SELECT job_id, user_id, session_id, trace_id, mode, model, provider, 'running', 1,
       %(holder)s, now() + %(lease)s, now(), api_key_id, end_user, metadata
FROM input ORDER BY job_id
ON CONFLICT (job_id) DO UPDATE SET
    attempt = j.attempt + 1, status = 'running', lease_owner = excluded.lease_owner,
    lease_until = excluded.lease_until, started_at = now(),
    model = excluded.model, provider = excluded.provider,
    user_id = excluded.user_id, session_id = excluded.session_id,
    trace_id = excluded.trace_id, mode = excluded.mode,
    error = NULL, finished_at = NULL
WHERE (j.status IN ('queued', 'running') AND j.user_id = excluded.user_id
       AND (j.lease_until IS NULL OR j.lease_until < now()))
   -- a rejected request never took the id: a valid one claims it over
   OR j.status = 'rejected'
RETURNING j.job_id, j.attempt, (SELECT status FROM before b WHERE b.job_id = j.job_id),
          j.handed
"""

# Each job's session's last turns (its own excluded), oldest first, in one statement.
_HISTORIES: LiteralString = """
SELECT r.job_id, m.role, m.content, m.tool_calls, m.tool_call_id, m.thinking_blocks,
       m.attachments
FROM unnest(%(users)s::text[], %(sessions)s::text[], %(ids)s::text[])
    WITH ORDINALITY AS r(user_id, session_id, job_id, n)
CROSS JOIN LATERAL (
    SELECT id, role, content, tool_calls, tool_call_id, thinking_blocks, attachments
    FROM llm_messages
    WHERE user_id = r.user_id AND session_id = r.session_id AND job_id <> r.job_id
    ORDER BY id DESC LIMIT %(limit)s) m
ORDER BY r.n, m.id
"""


def _handed(job_id: str, stored: Any) -> Handed | None:
    """llm_jobs.handed as the claim read it; a value of another shape (written by
    something else) is left unused: the job starts its answer over."""
    if stored is None:
        return None
    try:
        return msgspec.convert(stored, Handed)
    except msgspec.ValidationError as exc:
        log.warning("job %s: its handed-back answer is unreadable (%s); it starts over",
                    job_id, exc)
        return None


def _histories(conn: psycopg.Connection[Any], orders: Sequence[ClaimOrder],
               limit: int) -> dict[str, list[Turn]]:
    if limit == 0:
        return {}
    found: dict[str, list[Turn]] = {}
    for job_id, role, content, calls, call_id, thinking, images in conn.execute(
            _HISTORIES, {"users": [o.user_id for o in orders],
                         "sessions": [o.session_id for o in orders],
                         "ids": [o.job_id for o in orders], "limit": limit}):
        found.setdefault(job_id, []).append(Turn(
            role=role, content=content, tool_call_id=call_id,
            tool_calls=None if calls is None else msgspec.convert(calls, list[CallMade]),
            thinking_blocks=thinking,
            images=None if images is None else msgspec.convert(images, list[ImageRef])))
    return found


def _returned_ids(cur: psycopg.Cursor[Any]) -> set[str]:
    """The ids an executemany(..., returning=True) returned: one result per record, its
    id when the row landed."""
    ids: set[str] = set()
    while True:
        ids.update(row[0] for row in cur.fetchall())
        if not cur.nextset():
            return ids


def _take(cur: psycopg.Cursor[Any], hold: Hold, period: str) -> list[Any]:
    """Reserve one hold in its current window, or raise _OverLimit."""
    window = _WINDOWS["minute" if hold.kind != "usd" else period]
    key = (hold.scope, hold.kind)
    cur.execute("INSERT INTO llm_budget_ledger (scope, kind, window_start) "
                f"VALUES (%s, %s, {window}) ON CONFLICT DO NOTHING", key)
    got = cur.execute(
        "UPDATE llm_budget_ledger SET reserved = reserved + %s "
        f"WHERE scope = %s AND kind = %s AND window_start = {window} "
        "AND used + reserved + %s <= %s RETURNING window_start",
        (hold.amount, *key, hold.amount, hold.limit)).fetchone()
    if got is None:
        now = cur.execute("SELECT used + reserved FROM llm_budget_ledger WHERE scope = %s "
                          f"AND kind = %s AND window_start = {window}", key).fetchone()
        raise _OverLimit(Refused(scope=hold.scope, kind=hold.kind, amount=hold.amount,
                                 limit=hold.limit, taken=float(now[0]) if now else 0.0))
    return [hold.scope, hold.kind, got[0].isoformat(), hold.amount]


def _release(cur: psycopg.Cursor[Any], holds: list[list[Any]], record: JobFinished | None) -> None:
    """Give back what `holds` reserved; with a finished job, count what it really used."""
    for scope, kind, window, amount in holds:
        used = _ACTUAL[kind](record) if record is not None else 0
        cur.execute("UPDATE llm_budget_ledger SET reserved = GREATEST(reserved - %s, 0), "
                    "used = used + %s WHERE scope = %s AND kind = %s AND window_start = %s",
                    (amount, used, scope, kind, window))


# -- the pg sink's batches: every row by column name, none by position ------------------

class _MessageRow(TypedDict):
    """One llm_messages row."""

    job_id: str
    session_id: str
    user_id: str
    role: str
    content: str
    tokens: int | None
    partial: bool
    tool_calls: Jsonb | None
    tool_call_id: str | None
    thinking_blocks: Jsonb | None
    attachments: Jsonb | None


class _AttachmentRow(TypedDict):
    """One llm_attachments row: an image's bytes, stored once per user and hash."""

    user_id: str
    sha256: str
    media_type: str
    data: bytes


_END_JOBS: LiteralString = """
UPDATE llm_jobs SET status = %(status)s, model = %(model)s, provider = %(provider)s,
    prompt_tokens = %(prompt_tokens)s, completion_tokens = %(completion_tokens)s,
    cost_usd = %(cost_usd)s, ttft_ms = %(ttft_ms)s, latency_ms = %(latency_ms)s,
    error = %(error)s, partial = %(partial)s, retrieval_ms = %(retrieval_ms)s,
    retrieval_hits = %(retrieval_hits)s, retries = %(retries)s, fallbacks = %(fallbacks)s,
    cached_tokens = %(cached_tokens)s, cache_write_tokens = %(cache_write_tokens)s,
    reasoning_tokens = %(reasoning_tokens)s,
    budget_holds = NULL, finished_at = now(), lease_until = NULL, handed = NULL
WHERE job_id = %(job_id)s AND lease_owner = %(lease_owner)s AND attempt = %(attempt)s
RETURNING job_id
"""

_STORE_ATTACHMENTS: LiteralString = """
INSERT INTO llm_attachments (user_id, sha256, media_type, data)
VALUES (%(user_id)s, %(sha256)s, %(media_type)s, %(data)s)
ON CONFLICT (user_id, sha256) DO NOTHING
"""

_STORE_MESSAGES: LiteralString = """
INSERT INTO llm_messages (job_id, session_id, user_id, role, content, tokens, partial,
                          tool_calls, tool_call_id, thinking_blocks, attachments)
VALUES (%(job_id)s, %(session_id)s, %(user_id)s, %(role)s, %(content)s, %(tokens)s,
        %(partial)s, %(tool_calls)s, %(tool_call_id)s, %(thinking_blocks)s, %(attachments)s)
ON CONFLICT (job_id, role, (coalesce(tool_call_id, ''))) DO NOTHING
"""

# A job id is never taken from its owner: a rejection lands only as a new row (attempt 1,
# which a valid request may later claim over), over the same user's rejection
# (redelivered), or, for a failed claim, over the same user's job that no live lease holds.
_REJECT_JOBS: LiteralString = """
INSERT INTO llm_jobs AS j (job_id, user_id, session_id, status, error, attempt, finished_at)
VALUES (%(job_id)s, %(user_id)s, %(session_id)s, %(status)s, %(error)s, 1, now())
ON CONFLICT (job_id) DO UPDATE SET status = EXCLUDED.status, error = EXCLUDED.error,
    finished_at = now(), lease_owner = NULL, lease_until = NULL, budget_holds = NULL
WHERE j.user_id = EXCLUDED.user_id AND (
    (EXCLUDED.status = 'rejected' AND j.status = 'rejected') OR
    (EXCLUDED.status = 'failed' AND j.status IN ('queued', 'running')
     AND (j.lease_until IS NULL OR j.lease_until < now())))
RETURNING job_id
"""


def _json(value: Any) -> Jsonb | None:
    """A JSON column's value: NULL for an empty list."""
    return Jsonb(value) if value else None


def _message(r: JobFinished, role: str, content: str, *, tokens: int | None = None,
             partial: bool = False, tool_calls: Jsonb | None = None,
             tool_call_id: str | None = None, thinking_blocks: Jsonb | None = None,
             attachments: Jsonb | None = None) -> _MessageRow:
    return _MessageRow(job_id=r.job_id, session_id=r.session_id, user_id=r.user_id,
                       role=role, content=content, tokens=tokens, partial=partial,
                       tool_calls=tool_calls, tool_call_id=tool_call_id,
                       thinking_blocks=thinking_blocks, attachments=attachments)


def _exchange(r: JobFinished) -> list[_MessageRow]:
    """The job's turns in history order: the tool results it answered, the user's
    message (none when the job only answered tool calls), then the answer with any
    calls it made."""
    turns = [_message(r, "tool", content, tool_call_id=call_id)
             for call_id, content in r.tool_results]
    if r.user_message:
        turns.append(_message(r, "user", r.user_message, tokens=r.user_tokens,
                              attachments=_json([msgspec.to_builtins(i.ref) for i in r.images])))
    if r.answer or r.tool_calls:
        turns.append(_message(r, "assistant", r.answer, tokens=r.completion_tokens,
                              partial=r.partial,
                              tool_calls=_json(msgspec.to_builtins(r.tool_calls)),
                              thinking_blocks=_json(r.thinking_blocks)))
    return turns


def _attachments(r: JobFinished) -> dict[tuple[str, str], _AttachmentRow]:
    """The bytes of the user message's new images, by user and content hash."""
    if not r.user_message:  # no user message, no images of it
        return {}
    return {(r.user_id, i.ref.sha256): _AttachmentRow(user_id=r.user_id, sha256=i.ref.sha256,
                                                       media_type=i.ref.media_type, data=i.data)
            for i in r.images if i.data}


def _settle_holds(cur: psycopg.Cursor[Any], finished: Sequence[JobFinished],
                  lease_holder: str) -> None:
    """Settle the jobs' reservations in the transaction of their terminal rows (the lease
    and attempt check it once): this attempt's to what it really used; an earlier
    attempt's, when this one ended before reserving (cancelled, refused, timed out),
    given back unused."""
    by_id = {r.job_id: r for r in finished}
    for job_id, attempt, holds in cur.execute(
            "SELECT job_id, attempt, budget_holds FROM llm_jobs "
            "WHERE job_id = ANY(%s) AND lease_owner = %s "
            "AND budget_holds IS NOT NULL ORDER BY job_id FOR UPDATE",
            (list(by_id), lease_holder)).fetchall():
        record = by_id[job_id]
        if attempt == record.attempt:
            _release(cur, holds, record if record.reserved else None)


def _end_jobs(cur: psycopg.Cursor[Any], finished: Sequence[JobFinished],
              lease_holder: str) -> set[str]:
    """Write the terminal rows still under this holder's lease of the same attempt;
    return the ids that landed."""
    # The statement takes the record's own fields by name, and the holder that fences it.
    cur.executemany(_END_JOBS, [msgspec.structs.asdict(r) | {"lease_owner": lease_holder}
                                for r in finished], returning=True)
    return _returned_ids(cur)


def _store_exchanges(cur: psycopg.Cursor[Any], finished: Iterable[JobFinished]) -> None:
    """Write the jobs' turns to the history, and the bytes of their images."""
    messages: list[_MessageRow] = []
    images: dict[tuple[str, str], _AttachmentRow] = {}
    for r in finished:
        messages += _exchange(r)
        images |= _attachments(r)
    # The bytes once per user and content hash, in hash order (no deadlock between two
    # batches storing the same images).
    cur.executemany(_STORE_ATTACHMENTS, [images[key] for key in sorted(images)])
    cur.executemany(_STORE_MESSAGES, messages)


def _reject_jobs(cur: psycopg.Cursor[Any], rejected: Sequence[JobRejected]) -> set[str]:
    """Write the rows of jobs that never ran (see _REJECT_JOBS); return the ids that
    landed. A failed claim's job gives back what it had reserved."""
    for _, holds in cur.execute(
            "SELECT job_id, budget_holds FROM llm_jobs WHERE job_id = ANY(%s) "
            "AND budget_holds IS NOT NULL AND status IN ('queued', 'running') "
            "AND (lease_until IS NULL OR lease_until < now()) "
            "ORDER BY job_id FOR UPDATE", ([r.job_id for r in rejected],)).fetchall():
        _release(cur, holds, None)
    # The statement takes the record's own fields by name.
    cur.executemany(_REJECT_JOBS, [msgspec.structs.asdict(r) for r in rejected],
                    returning=True)
    return _returned_ids(cur)


def _write_batch(conn: psycopg.Connection[Any], records: Sequence[JobFinished | JobRejected],
                 lease_holder: str) -> set[str]:
    """Postgres.write_records in one transaction; return the ids that did not land."""
    finished = [r for r in records if isinstance(r, JobFinished)]
    rejected = [r for r in records if isinstance(r, JobRejected)]
    landed: set[str] = set()
    with conn.transaction(), conn.cursor() as cur:
        if finished:
            _settle_holds(cur, finished, lease_holder)
            landed |= _end_jobs(cur, finished, lease_holder)
            _store_exchanges(cur, [r for r in finished if r.messages and r.job_id in landed])
        if rejected:
            landed |= _reject_jobs(cur, rejected)
    return {r.job_id for r in records} - landed


def apply_migrations(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply our numbered SQL migrations not yet applied; return the names applied."""
    folder = resources.files("actors.adapters") / "migrations"
    scripts = sorted((p.name, p.read_text()) for p in folder.iterdir() if p.name.endswith(".sql"))
    applied: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS chat_actors_migrations ("
                     "name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        done = {r[0] for r in conn.execute("SELECT name FROM chat_actors_migrations")}
        for name, script in scripts:
            if name in done:
                continue
            # Our own migration files: psycopg types queries as literal strings.
            conn.execute(cast(LiteralString, script))
            conn.execute("INSERT INTO chat_actors_migrations (name) VALUES (%s)", (name,))
            applied.append(name)
    return applied


class Postgres:
    """Request/reply queries on a small pool, each call in a worker thread.

    No call can hang for good, so none can starve the pool or its limiter (a thread
    abandoned on cancel keeps its limiter token until it ends): every call is one
    transaction whose statements end within `statement_timeout_s`, and which the
    server ends if it sits idle that long (SET LOCAL, so both hold through PgBouncer
    in transaction mode), connecting ends within 5 s, and TCP keepalive with a user
    timeout ends a call on a peer that vanished.
    """

    @classmethod
    def of(cls, postgres: PostgresConfig, *, pool_size: int | None = None) -> Postgres:
        """The pool `postgres` (the config section) describes."""
        return cls(dsn=postgres.dsn, pool_size=pool_size or postgres.pool_size,
                   statement_timeout_s=postgres.statement_timeout_s,
                   prepare_threshold=postgres.prepare_after)

    def __init__(self, *, dsn: str, pool_size: int, statement_timeout_s: float = 30.0,
                 prepare_threshold: int | None = 5) -> None:
        self._dsn = dsn
        self._prepare_threshold = prepare_threshold
        self._idle: list[psycopg.Connection[Any]] = []
        self._limiter = trio.CapacityLimiter(pool_size)
        self._closed = False
        ms = max(1, round(statement_timeout_s * 1000))
        # One round trip opens the transaction and sets its limits (simple protocol). A
        # transaction left idle as long (its process frozen mid-call: a SIGSTOP, a VM
        # pause) is ended by the server, so the row locks it took (a claim's) never keep
        # other workers from taking the job over.
        self._begin = sql.SQL("BEGIN; SET LOCAL statement_timeout = {ms}; "
                              "SET LOCAL idle_in_transaction_session_timeout = {ms}"
                              ).format(ms=ms)
        self._tcp_user_timeout_ms = ms + 5000

    # -- plumbing ---------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=5,
                               application_name="chat-actors", keepalives=1,
                               keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
                               tcp_user_timeout=self._tcp_user_timeout_ms)
        conn.prepare_threshold = self._prepare_threshold
        return conn

    def call(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run `fn(conn)` here, blocking, with a pooled connection, as one transaction
        whose statements end within the statement timeout. For worker threads and
        the CLI; psycopg's errors come out as TransientError or PermanentError."""
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = None
        try:
            conn = conn or self._connect()
            conn.execute(self._begin)
            result = fn(conn)  # its own `conn.transaction()` blocks become savepoints
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn is not None:
                conn.close()  # a broken connection is never returned to the pool
            if isinstance(exc, psycopg.Error):
                raise _translate(exc) from exc
            raise
        if self._closed:  # an abandoned call that outlived the pool
            conn.close()
        else:
            self._idle.append(conn)
        return result

    async def run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """`call(fn)` in a worker thread, at most `pool_size` at once."""
        # Abandon on cancel: a job must be able to end (deadline, cancel) even while
        # Postgres hangs; the thread finishes or fails on its own later.
        return await trio.to_thread.run_sync(functools.partial(self.call, fn), limiter=self._limiter,
                                             abandon_on_cancel=True)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    # -- schema -----------------------------------------------------------------------
    async def migrate(self) -> list[str]:
        """Apply numbered SQL migrations not yet applied; return the names applied."""
        return await self.run(apply_migrations)

    async def claim(self, *, job_id: str, user_id: str, session_id: str, trace_id: str,
                    mode: str, model: str, provider: str, lease_holder: str,
                    lease_s: float, history_limit: int = 0, api_key_id: str | None = None,
                    end_user: str | None = None,
                    metadata: dict[str, str] | None = None) -> ClaimResult:
        """One job's claim_many."""
        order = ClaimOrder(job_id=job_id, user_id=user_id, session_id=session_id,
                           trace_id=trace_id, mode=mode, model=model, provider=provider,
                           api_key_id=api_key_id, end_user=end_user, metadata=metadata)
        (result,) = await self.claim_many([order], lease_holder=lease_holder, lease_s=lease_s,
                                          history_limit=history_limit)
        return result

    async def claim_many(self, orders: Sequence[ClaimOrder], *, lease_holder: str,
                         lease_s: float, history_limit: int = 0) -> list[ClaimResult]:
        """Take each job's lease: a new job runs as attempt 1, an expired lease as attempt + 1.
        One round trip for them all, in one thread hop: the claim, the rows of the jobs
        not claimed, and each claimed job's session's last `history_limit` turns. The
        job ids must differ. Rows are locked in job id order, so two workers claiming
        overlapping batches never deadlock."""
        ids = [order.job_id for order in orders]
        if len(set(ids)) != len(ids):
            raise ValueError("claim_many: a job id appears twice in one batch")

        def claim(conn: psycopg.Connection[Any]) -> list[ClaimResult]:
            claimed = {row[0]: (row[1], row[2], row[3]) for row in conn.execute(
                _CLAIM_MANY, {"ids": ids, "users": [o.user_id for o in orders],
                              "sessions": [o.session_id for o in orders],
                              "traces": [o.trace_id for o in orders],
                              "modes": [o.mode for o in orders],
                              "models": [o.model for o in orders],
                              "providers": [o.provider for o in orders],
                              "keys": [o.api_key_id for o in orders],
                              "end_users": [o.end_user for o in orders],
                              "metadata": [_json(o.metadata) for o in orders],
                              "holder": lease_holder, "lease": timedelta(seconds=lease_s)})}
            others = [job_id for job_id in ids if job_id not in claimed]
            rows = {row[0]: row[1:] for row in conn.execute(
                "SELECT job_id, status, user_id, lease_owner, attempt, partial FROM llm_jobs "
                "WHERE job_id = ANY(%s)", (others,))} if others else {}
            mine = [o for o in orders if o.job_id in claimed]
            history = _histories(conn, mine, history_limit) if mine else {}
            results: list[ClaimResult] = []
            for order in orders:
                if order.job_id in claimed:
                    attempt, before, handed = claimed[order.job_id]
                    results.append(Claimed(attempt, history.get(order.job_id, []),
                                           over_rejected=before == "rejected",
                                           handed=_handed(order.job_id, handed)))
                    continue
                existing = rows.get(order.job_id)
                if existing is None:  # deleted between the two statements
                    raise TransientError(f"job {order.job_id}: its row vanished while it was "
                                         "claimed")
                status, row_user, lease_owner, attempt, partial = existing
                if row_user != order.user_id:
                    results.append(OwnedByAnotherUser())
                elif status in _TERMINAL:
                    results.append(AlreadyTerminal(status, max(attempt, 1), partial,
                                                   ran=attempt > 0))
                else:
                    results.append(LeasedElsewhere(lease_owner or ""))
            return results

        return await self.run(claim)

    async def renew_leases(self, *, job_ids: Sequence[str], lease_holder: str,
                           lease_s: float) -> set[str]:
        """Extend every lease `lease_holder` still holds among `job_ids`. Return the jobs
        still its own: those renewed, and those it already ended (a job whose terminal
        row lands while this runs is not lost). The rest were taken over."""

        def renew(conn: psycopg.Connection[Any]) -> set[str]:
            rows = conn.execute(
                "WITH mine AS (SELECT job_id, status FROM llm_jobs"
                "              WHERE job_id = ANY(%(ids)s) AND lease_owner = %(me)s),"
                " renewed AS (UPDATE llm_jobs SET lease_until = now() + %(lease)s"
                "             WHERE job_id IN (SELECT job_id FROM mine WHERE status = 'running')"
                "             AND lease_owner = %(me)s AND status = 'running' RETURNING job_id)"
                " SELECT job_id FROM renewed"
                " UNION ALL SELECT job_id FROM mine WHERE status <> 'running'",
                {"ids": list(job_ids), "me": lease_holder,
                 "lease": timedelta(seconds=lease_s)})
            return {row[0] for row in rows}

        return await self.run(renew)

    async def reserve(self, *, job_id: str, lease_holder: str, holds: Sequence[Hold],
                      period: str) -> Refused | None:
        """Reserve every hold for the job, all or none, in one transaction.

        Each is one conditional UPDATE (used + reserved + amount <= limit) on the
        ledger row, which Postgres re-checks on the latest row version after any
        concurrent writer commits: concurrent jobs can never reserve past a limit.
        What an earlier attempt of the job still holds is given back first."""

        def reserve(conn: psycopg.Connection[Any]) -> Refused | None:
            try:
                with conn.transaction(), conn.cursor() as cur:
                    row = cur.execute("SELECT budget_holds FROM llm_jobs WHERE job_id = %s "
                                      "AND lease_owner = %s FOR UPDATE", (job_id, lease_holder)).fetchone()
                    if row is None:
                        raise TransientError(f"job {job_id}: lease lost before its reservation")
                    _release(cur, row[0] or [], None)
                    taken = [_take(cur, hold, period)
                             for hold in sorted(holds, key=lambda h: (h.scope, h.kind))]
                    cur.execute("UPDATE llm_jobs SET budget_holds = %s WHERE job_id = %s",
                                (Jsonb(taken), job_id))
            except _OverLimit as over:  # the transaction rolled back: nothing is held
                return over.refused
            return None

        return await self.run(reserve)

    async def prune_ledger(self, *, period: str) -> int:
        """Delete ledger windows no reservation counts in any more (rates older than an
        hour, money older than the previous period); return how many."""
        return await self.run(lambda conn: conn.execute(
            "DELETE FROM llm_budget_ledger WHERE window_start < CASE WHEN kind = 'usd' "
            "THEN date_trunc(%(period)s, now(), 'UTC') - ('1 ' || %(period)s)::interval "
            "ELSE now() - interval '1 hour' END", {"period": period}).rowcount)

    async def images(self, *, user_id: str, hashes: Iterable[str]) -> dict[str, tuple[str, bytes]]:
        """The user's stored images by content hash: (media type, bytes)."""
        wanted = sorted(set(hashes))
        if not wanted:
            return {}
        rows = await self.run(lambda conn: conn.execute(
            "SELECT sha256, media_type, data FROM llm_attachments "
            "WHERE user_id = %s AND sha256 = ANY(%s)", (user_id, wanted)).fetchall())
        return {sha: (media_type, bytes(data)) for sha, media_type, data in rows}

    # -- the gateway's history (read-only but for delete) -----------------------------
    async def sessions(self, *, user_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The user's sessions, newest first: id, turns, first message, last activity."""
        rows = await self.run(lambda conn: conn.execute(
            "SELECT session_id, count(*) FILTER (WHERE role = 'user'), max(created_at), "
            "(array_agg(content ORDER BY id) FILTER (WHERE role = 'user'))[1] "
            # cc-: a Chat Completions call's own session (contract 7.2), never listed
            "FROM llm_messages WHERE user_id = %s AND session_id NOT LIKE 'cc-%%' "
            "GROUP BY session_id "
            "ORDER BY max(created_at) DESC LIMIT %s", (user_id, limit)).fetchall())
        return [{"sessionId": r[0], "turns": r[1], "lastAt": r[2].isoformat(),
                 "title": (r[3] or "")[:80]} for r in rows]

    async def session_messages(self, *, user_id: str, session_id: str,
                               limit: int = 500) -> list[dict[str, Any]]:
        """One session's turns in order (only the user's own: another's look empty)."""
        rows = await self.run(lambda conn: conn.execute(
            "SELECT job_id, role, content, partial, tool_calls, tool_call_id, attachments, "
            "created_at FROM llm_messages WHERE user_id = %s AND session_id = %s "
            "ORDER BY id LIMIT %s", (user_id, session_id, limit)).fetchall())
        turns: list[dict[str, Any]] = []
        for job_id, role, content, partial, calls, call_id, images, at in rows:
            turn: dict[str, Any] = {"jobId": job_id, "role": role, "content": content,
                                    "partial": partial, "createdAt": at.isoformat()}
            if calls:
                turn["toolCalls"] = calls
            if call_id:
                turn["toolCallId"] = call_id
            if images:
                turn["attachments"] = len(images)
            turns.append(turn)
        return turns

    async def delete_session(self, *, user_id: str, session_id: str) -> int:
        """Delete one session's history (the worker never reads it again), and the
        user's stored images no turn refers to any more; return the turns deleted."""
        def delete(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                gone = conn.execute("DELETE FROM llm_messages WHERE user_id = %s AND "
                                    "session_id = %s", (user_id, session_id)).rowcount
                conn.execute(
                    "DELETE FROM llm_attachments a WHERE a.user_id = %s AND NOT EXISTS ("
                    "SELECT 1 FROM llm_messages m, jsonb_array_elements(m.attachments) ref "
                    "WHERE m.user_id = a.user_id AND m.attachments IS NOT NULL "
                    "AND ref->>'sha256' = a.sha256)", (user_id,))
                return gone
        return await self.run(delete)

    async def fence_refused(self, *, job_id: str, user_id: str, session_id: str,
                            reason: str) -> bool:
        """End a job whose request the gateway could not confirm, before any worker
        claims it: its row is written terminal (`cancelled`, attempt 0, `error` says
        why), so the request, should it reach a worker later, is never run (a claim
        takes only a live or rejected row over). True when fenced; False when a worker
        holds the job already (the request was accepted after all)."""
        def fence(conn: psycopg.Connection[Any]) -> bool:
            return conn.execute(
                "INSERT INTO llm_jobs (job_id, user_id, session_id, status, attempt, error, "
                "finished_at) VALUES (%s, %s, %s, 'cancelled', 0, %s, now()) "
                "ON CONFLICT (job_id) DO NOTHING RETURNING job_id",
                (job_id, user_id, session_id, f"refused: {reason}")).fetchone() is not None
        return await self.run(fence)

    async def usage(self, *, user_id: str | None, since: datetime | None,
                    by_key: bool = False) -> list[UsageRow]:
        """Jobs, tokens and cost by user and model alias, newest rows included; with
        `by_key`, by user, API key (None: jobs a JWT authenticated) and model alias."""
        key: LiteralString = "api_key_id" if by_key else "NULL::text"
        rows = await self.run(lambda conn: conn.execute(
            f"SELECT user_id, {key}, coalesce(model, '-'), count(*), "
            "coalesce(sum(prompt_tokens), 0), "
            "coalesce(sum(completion_tokens), 0), coalesce(sum(cost_usd), 0), "
            "coalesce(sum(cached_tokens), 0), coalesce(sum(cache_write_tokens), 0), "
            "coalesce(sum(reasoning_tokens), 0) FROM llm_jobs "
            "WHERE (%(user)s::text IS NULL OR user_id = %(user)s) "
            "AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s) "
            "AND status <> 'rejected' GROUP BY 1, 2, 3 ORDER BY 1, 2 NULLS FIRST, 3",
            {"user": user_id, "since": since}).fetchall())
        return [UsageRow(user_id=r[0], api_key_id=r[1], model=r[2], jobs=r[3],
                         prompt_tokens=int(r[4]), completion_tokens=int(r[5]),
                         cost_usd=float(r[6]), cached_tokens=int(r[7]),
                         cache_write_tokens=int(r[8]), reasoning_tokens=int(r[9]))
                for r in rows]

    # -- API keys: the CLI creates, lists and revokes them; the gateway looks them up ----
    async def create_key(self, *, user_id: str, name: str | None = None) -> tuple[str, str]:
        """A new API key of `user_id`: (its id, the key). The key is `cak_` + 43 base64url
        characters (256 random bits); only its SHA-256 is stored, so this is the one time
        anyone sees it."""
        key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(12)
        shown = f"{API_KEY_PREFIX}…{key[-4:]}"
        await self.run(lambda conn: conn.execute(
            "INSERT INTO llm_api_keys (id, user_id, name, secret_sha256, shown) "
            "VALUES (%s, %s, %s, %s, %s)",
            (key_id, user_id, name, hashlib.sha256(key.encode()).hexdigest(), shown)))
        return key_id, key

    async def list_keys(self, *, user_id: str | None = None) -> list[dict[str, Any]]:
        """Every key (or `user_id`'s) by user, oldest first: id, name, user, shown (prefix
        and last 4 characters), created, last_used and revoked (datetimes or None)."""
        rows = await self.run(lambda conn: conn.execute(
            "SELECT id, name, user_id, shown, created_at, last_used_at, revoked_at "
            "FROM llm_api_keys WHERE (%(user)s::text IS NULL OR user_id = %(user)s) "
            "ORDER BY user_id, created_at, id", {"user": user_id}).fetchall())
        return [{"id": r[0], "name": r[1], "user": r[2], "shown": r[3], "created": r[4],
                 "last_used": r[5], "revoked": r[6]} for r in rows]

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke the key (from now on; a key revoked before keeps its first revocation
        time). False when there is no such key."""
        return await self.run(lambda conn: conn.execute(
            "UPDATE llm_api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s "
            "RETURNING id", (key_id,)).fetchone() is not None)

    async def key_owner(self, secret_sha256: str) -> tuple[str, str] | None:
        """(key id, user id) of the unrevoked key whose SHA-256 (hex) this is, or None."""
        row = await self.run(lambda conn: conn.execute(
            "SELECT id, user_id FROM llm_api_keys WHERE secret_sha256 = %s "
            "AND revoked_at IS NULL", (secret_sha256,)).fetchone())
        return None if row is None else (row[0], row[1])

    async def touch_key(self, key_id: str) -> None:
        """Record that the key was just used (last_used_at)."""
        await self.run(lambda conn: conn.execute(
            "UPDATE llm_api_keys SET last_used_at = now() WHERE id = %s", (key_id,)))

    async def next_attempt(self, *, job_id: str, lease_holder: str, attempt: int) -> bool:
        """The job starts over as attempt + 1 under the same lease: what an earlier
        attempt handed back is spent, and that attempt's terminal write is fenced out."""
        rows = await self.run(lambda conn: conn.execute(
            "UPDATE llm_jobs SET attempt = attempt + 1, handed = NULL WHERE job_id = %s "
            "AND lease_owner = %s AND attempt = %s AND status = 'running' RETURNING attempt",
            (job_id, lease_holder, attempt)).fetchall())
        return bool(rows)

    async def release_lease(self, *, job_id: str, lease_holder: str,
                            handed: Handed | None = None) -> None:
        """Give a job back unfinished: the next delivery runs it again at once. `handed`:
        the attempt's answer so far, for the next attempt to continue (only while that
        attempt still holds the job)."""
        if handed is None:
            await self.run(lambda conn: conn.execute(
                "UPDATE llm_jobs SET status = 'queued', lease_owner = NULL, lease_until = NULL "
                "WHERE job_id = %s AND lease_owner = %s AND status = 'running'",
                (job_id, lease_holder)))
            return
        stored = Jsonb(msgspec.to_builtins(handed))
        await self.run(lambda conn: conn.execute(
            "UPDATE llm_jobs SET status = 'queued', lease_owner = NULL, lease_until = NULL, "
            "handed = %s WHERE job_id = %s AND lease_owner = %s AND status = 'running' "
            "AND attempt = %s", (stored, job_id, lease_holder, handed.attempt)))

    # -- the pg sink's batches ------------------------------------------------------------
    async def write_records(self, records: Sequence[JobFinished | JobRejected],
                            lease_holder: str) -> set[str]:
        """Write a batch in one transaction: terminal job rows and their messages.
        Each terminal row lands only under this holder's lease of the same attempt
        (contract 6.11); the ids of those that did not are returned, and their messages
        and budget settlement are not written either."""
        return await self.run(lambda conn: _write_batch(conn, records, lease_holder))
