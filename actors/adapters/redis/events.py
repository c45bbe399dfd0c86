"""Redis Streams behind our ports: sync redis-py, pipelined, in one worker thread.

Measured: a sync pipeline of 64 XADDs in a thread costs ~20 us per
event, against ~130 us for one awaited XADD through redis.asyncio on the bridge.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.exceptions as redis_errors
import trio

from actors.adapters.redis.connect import RedisConnect
from actors.errors import PermanentError, TransientError
from config import JobKeys
from config import Redis as RedisConfig
from messages.ports import Streamed, StreamEntry

T = TypeVar("T")
log = logging.getLogger("chat_actors.redis")
TERMINAL = ("final", "done")  # the events written with WAIT when the primary has replicas
REPLICAS_EVERY_S = 10.0  # how long a look at a single Redis's replicas is trusted

# States a server passes through: out of memory, a failed snapshot, loading, a replica
# mid-failover, a busy script, a cluster reconfiguring. Retried, and named in /readyz.
_PASSING = (redis.ConnectionError, redis.TimeoutError, redis_errors.BusyLoadingError,
            redis_errors.ReadOnlyError, redis_errors.OutOfMemoryError,
            redis_errors.TryAgainError, redis_errors.MasterDownError,
            redis_errors.ClusterDownError, redis_errors.MaxConnectionsError)
# The same states as error replies redis-py does not type (from inside a script, a
# pipeline, or a server newer than the client).
_PASSING_REPLY = re.compile(r"(^|[\s:-])(OOM|MISCONF|LOADING|READONLY|BUSY|MASTERDOWN|TRYAGAIN"
                            r"|CLUSTERDOWN|NOREPLICAS|MOVED|ASK)\b")


# How redis-py names a sentinel it asked in vain: its client's whole repr (a screenful).
_SENTINEL_REPR = re.compile(r"<redis\.client\.Redis\(.*?host=([^,]+),port=(\d+).*?\)>\)>\)>")


def _streamed(fields: dict[bytes, bytes], job_id: str) -> Streamed | None:
    def text(name: bytes) -> str:
        return fields.get(name, b"").decode("utf-8", "replace")

    try:
        attempt, seq = int(text(b"attempt")), int(text(b"seq"))
    except ValueError:
        return None
    if text(b"jobId") != job_id:
        return None
    return Streamed(event=text(b"event"), attempt=attempt, seq=seq, data=text(b"data"))


def translate(exc: redis.RedisError) -> TransientError | PermanentError:
    text = _SENTINEL_REPR.sub(r"sentinel \1:\2", f"redis: {type(exc).__name__}: {exc}")
    if isinstance(exc, _PASSING) or (isinstance(exc, redis.ResponseError)
                                     and _PASSING_REPLY.search(str(exc))):
        return TransientError(text, kind="server_state")
    return PermanentError(text, code="redis")

# Appends one entry, in one script so nothing can come between the checks and the
# write (contract 6.11):
# - a later attempt holds the job (its attempt key is higher): nothing, -1;
# - its seq was already written for this (job, attempt), as when a pipeline is
#   retried after a lost reply: nothing, 0;
# - else the entry, 1. A `done` (ARGV[5], its data) then also arms the stream's expiry
#   and the job's done marker: only a `done` that was appended counts.
# KEYS: the stream, this attempt's high-water seq, the job's attempt, its done marker.
# ARGV: seq, maxlen, ttl_s, attempt, the done's data or '', the entry's fields...
_APPEND_ONCE = """
local attempt = tonumber(ARGV[4])
if attempt < tonumber(redis.call('GET', KEYS[3]) or '0') then return -1 end
redis.call('SET', KEYS[3], attempt, 'EX', ARGV[3])
local high = tonumber(redis.call('GET', KEYS[2]) or '-1')
local seq = tonumber(ARGV[1])
if seq <= high then return 0 end
if ARGV[5] ~= '' and redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 6))
redis.call('SET', KEYS[2], seq, 'EX', ARGV[3])
if ARGV[5] ~= '' then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('SET', KEYS[4], ARGV[5], 'EX', ARGV[3])
end
return 1
"""

# Hands a job id over from a rejected request to a valid one claiming it (attempt N):
# the rejection's done marker goes, and its stream when it is the job's own (ARGV[2]);
# the attempt key rises to N at once, so a late entry of the rejection is refused.
# KEYS: the stream, the job's attempt, its done marker. ARGV: attempt, own stream, ttl_s.
_HAND_OVER = """
if tonumber(ARGV[1]) <= tonumber(redis.call('GET', KEYS[2]) or '0') then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
redis.call('DEL', KEYS[3])
if ARGV[2] == '1' then redis.call('DEL', KEYS[1]) end
return 1
"""


# Fences a job's earlier attempts out as a later one takes it over: its attempt key
# rises to that attempt (never falls), so no earlier attempt's append lands after this.
# KEYS: the job's attempt. ARGV: attempt, ttl_s.
_FENCE = """
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return 1
"""
READ_PAGE = 1000  # entries per XRANGE while a job's stream is read back


class _Ask:
    __slots__ = ("done", "error", "found", "key")

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.done = trio.Event()
        self.found = False
        self.error: TransientError | PermanentError | None = None


class FenceReads:
    """Fence reads of every job asking at once, in one round trip. Whoever asks while
    no read is in flight reads the batch waiting then (in a worker thread, outside the
    writer's: a read must not wait behind the batches it queues); the others wait for
    it, and one of those that arrived meanwhile reads the next. The read in flight is
    shielded, since others wait on it; it is bounded by the socket timeout."""

    def __init__(self, read: Callable[[list[tuple[str, int]]], list[bool]]) -> None:
        self._read = read
        self._waiting: list[_Ask] = []
        self._round: trio.Event | None = None  # set when the read in flight ends

    async def ask(self, key: tuple[str, int]) -> bool:
        ask = _Ask(key)
        self._waiting.append(ask)
        while not ask.done.is_set():
            if self._round is not None:
                await self._round.wait()
                continue
            self._round = round_ = trio.Event()
            batch, self._waiting = self._waiting, []
            try:
                with trio.CancelScope(shield=True):
                    found = await trio.to_thread.run_sync(self._read, [a.key for a in batch])
                for each, fenced in zip(batch, found, strict=True):
                    each.found = fenced
            except redis.RedisError as exc:
                for each in batch:
                    each.error = translate(exc)
            finally:
                for each in batch:
                    each.done.set()
                self._round = None
                round_.set()
        if ask.error is not None:
            raise ask.error
        return ask.found


class RedisEvents:
    """`keys` names a job's keys (config.job_keys: the done marker is separate from the
    stream, so a shared stream still answers "is this job done?"). With `cluster`, each
    pipeline is plain (no MULTI/EXEC across slots): every script touches the keys of
    one job, which share a slot.

    Replication is asynchronous: a primary that fails over may lose what it took last.
    A batch holding a `final` or a `done` is therefore followed by WAIT for one replica
    (at most `replica_wait_ms`) on each primary it wrote to, when that primary has
    replicas, so a job's end survives a failover; token entries do not wait (a lost one
    shows as a gap in `seq`, and `final.text` holds the whole answer)."""

    def __init__(self, redis_config: RedisConfig, *, maxlen: int, ttl_s: int,
                 keys: Callable[[str], JobKeys]) -> None:
        cluster = redis_config.cluster
        timeout_s = redis_config.socket_timeout_s
        options: dict[str, Any] = {"socket_timeout": timeout_s,
                                   "socket_connect_timeout": min(5.0, timeout_s)}
        if not cluster:
            options["health_check_interval"] = 30
        self._connect = RedisConnect(redis_config, **options)
        self._client: Any = self._connect.client
        self._cluster = cluster
        self._keys = keys
        self._append_once = self._client.register_script(_APPEND_ONCE)
        self._hand_over = self._client.register_script(_HAND_OVER)
        self._fence = self._client.register_script(_FENCE)
        self._maxlen = maxlen
        self._ttl_s = ttl_s
        self._limiter = trio.CapacityLimiter(1)  # one writer thread keeps the order
        self._replica_wait_ms = redis_config.replica_wait_ms
        self._replicas_seen: tuple[float, bool] = (-REPLICAS_EVERY_S, False)
        self.waits_unacknowledged = 0  # WAITs that no replica answered in time
        self._node_clients: dict[int, Any] = {}
        self._fences = FenceReads(self._read_fences)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._cluster:
            # redis-py re-reads a cluster's topology after a failure and drops the node
            # clients it had without closing them: keep each, to close at the end.
            self._node_clients.update((id(n.redis_connection), n.redis_connection)
                                      for n in self._client.get_nodes() if n.redis_connection)
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except redis.RedisError as exc:
            raise translate(exc) from exc

    async def write(self, entries: Sequence[StreamEntry]) -> set[tuple[str, int]]:
        """Append every entry in one pipelined round trip; return the (job, attempt) of
        entries not written because a later attempt holds the job."""

        def pipeline() -> set[tuple[str, int]]:
            calls = []
            for entry in entries:
                event = entry.event
                fields = [item for pair in event.fields().items() for item in pair]
                done = event.data if event.event == "done" else ""
                keys = self._keys(event.job_id)
                calls.append(([entry.key, keys.seq(event.attempt), keys.attempt, keys.done],
                              [event.seq, self._maxlen, self._ttl_s, event.attempt, done,
                               *fields]))
            results = self._cluster_appends(calls) if self._cluster else self._appends(calls)
            ends = [entry.key for entry, result in zip(entries, results, strict=True)
                    if result == 1 and entry.event.event in TERMINAL]
            if ends:
                self._replicated(ends)
            return {(entry.event.job_id, entry.event.attempt)
                    for entry, result in zip(entries, results, strict=True) if result == -1}

        return await self._run(pipeline)

    def _appends(self, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
        """One MULTI/EXEC of EVALSHAs. (A pipeline of redis-py Script objects asks SCRIPT
        EXISTS before every batch: a round trip each.) A server that lacks the script
        (a restart, a failover, SCRIPT FLUSH) is given it, and the batch is sent again:
        each append is idempotent."""
        try:
            return self._evalshas(calls)
        except redis_errors.NoScriptError:
            self._client.script_load(_APPEND_ONCE)
            return self._evalshas(calls)

    def _evalshas(self, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=True)
        sha = self._append_once.sha
        for keys, args in calls:
            pipe.evalsha(sha, len(keys), *keys, *args)
        return list(pipe.execute())

    def _cluster_appends(self, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
        """One plain pipeline per primary (redis-py's cluster pipeline runs no scripts):
        a job's keys share a slot, so its entries keep their order on their node. A
        node that moved the slot or went away: the topology is read again, and the
        writer retries the batch (each append is idempotent)."""
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for n, (keys, _) in enumerate(calls):
            node = self._client.get_node_from_key(keys[0])
            by_node.setdefault(node.name, (node, []))[1].append(n)
        results: list[Any] = [None] * len(calls)
        try:
            for node, indexes in by_node.values():
                pipe = node.redis_connection.pipeline(transaction=False)
                for n in indexes:
                    self._append_once(keys=calls[n][0], args=calls[n][1], client=pipe)
                for n, result in zip(indexes, pipe.execute(), strict=True):
                    results[n] = result
        except redis.RedisError:
            self._relearn_nodes()
            raise
        return results

    def _relearn_nodes(self) -> None:
        """Read the cluster's topology again (the node clients it replaces are closed
        with this object: `close`)."""
        with contextlib.suppress(redis.RedisError):
            self._client.nodes_manager.initialize()

    def _replicated(self, keys: list[str]) -> None:
        """WAIT for one replica on the primaries holding `keys`, where replicas exist."""
        if self._replica_wait_ms <= 0:
            return
        if self._cluster:
            if not self._client.get_replicas():
                return
            nodes = {node.name: node for node in map(self._client.get_node_from_key, keys)}
            acked = [self._client.execute_command("WAIT", 1, self._replica_wait_ms,
                                                  target_nodes=node) for node in nodes.values()]
        else:
            checked, has = self._replicas_seen
            if time.monotonic() - checked > REPLICAS_EVERY_S:
                has = int(self._client.info("replication").get("connected_slaves", 0)) > 0
                self._replicas_seen = (time.monotonic(), has)
            if not has:
                return
            acked = [self._client.execute_command("WAIT", 1, self._replica_wait_ms)]
        missed = sum(1 for n in acked if int(n) < 1)
        if missed:
            self.waits_unacknowledged += missed
            self._replicas_seen = (-REPLICAS_EVERY_S, False)  # look again next time
            log.warning("no replica acknowledged a job's end within %d ms: a failover now "
                        "could lose it", self._replica_wait_ms)

    async def hand_over(self, job_id: str, attempt: int) -> None:
        """A valid request claimed `job_id` over a rejected one, as `attempt`: clear what
        the rejection wrote (its own stream, or on a shared stream only its done marker)."""
        keys = self._keys(job_id)
        await self._run(lambda: self._hand_over(
            keys=[keys.stream, keys.attempt, keys.done],
            args=[attempt, "1" if keys.own_stream else "0", self._ttl_s]))

    async def take_over(self, job_id: str, attempt: int) -> list[Streamed] | None:
        """Raise the job's attempt key to `attempt`, then read its stream back (None for
        a stream shared with other jobs: it is not read). An entry that is not one of
        ours (a missing field, an attempt or seq that is no number) is left out."""
        keys = self._keys(job_id)

        def read() -> list[Streamed] | None:
            self._fence(keys=[keys.attempt], args=[attempt, self._ttl_s])
            if not keys.own_stream:
                return None
            found: list[Streamed] = []
            start = "-"
            while True:
                page = self._client.xrange(keys.stream, min=start, count=READ_PAGE)
                found += filter(None, (_streamed(fields, job_id) for _, fields in page))
                if len(page) < READ_PAGE:
                    return found
                start = "(" + page[-1][0].decode()

        return await self._run(read)

    async def fenced(self, job_id: str, attempt: int) -> bool:
        """A later attempt holds the job, or its `done` is written. Every job asking at
        once is read in one pipelined round trip (FenceReads)."""
        return await self._fences.ask((job_id, attempt))

    def _read_fences(self, asked: list[tuple[str, int]]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for job_id, _ in asked:
            keys = self._keys(job_id)
            pipe.get(keys.attempt)
            pipe.exists(keys.done)
        replies = pipe.execute()
        found: list[bool] = []
        for n, (_, attempt) in enumerate(asked):
            holder, done = replies[2 * n], replies[2 * n + 1]
            try:
                later = holder is not None and int(holder) > attempt
            except ValueError:
                later = False  # not ours to judge: the fenced appends still decide
            found.append(later or bool(done))
        return found

    async def last_seq(self, job_id: str, attempt: int) -> int:
        """The highest seq written for this attempt, -1 if none."""
        value = await self._run(self._client.get, self._keys(job_id).seq(attempt))
        return int(value) if value is not None else -1

    async def done_recorded(self, job_id: str) -> bool:
        return bool(await self._run(self._client.exists, self._keys(job_id).done))

    async def ping(self) -> None:
        await self._run(self._client.ping)

    def close(self) -> None:
        self._connect.close()
        for client in self._node_clients.values():
            client.close()
