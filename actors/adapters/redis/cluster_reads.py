"""The gateway's stream reading on a Redis Cluster: one watcher per primary node.

A blocking XREAD may name only streams of one hash slot, and in cluster mode each
job's stream has a slot of its own ({job_id} is its hash tag), so the single-Redis
reader (one XREAD over many streams) cannot be used. Instead each primary is asked
for keyspace notifications of stream commands (`notify-keyspace-events` with K and
t; set by the gateway at start when allowed), and one Pub/Sub connection per primary
learns which followed streams were appended to. A reader then reads only those, one
non-blocking XREAD each, pipelined per node. Pub/Sub delivers at most once, so every
stream is read again whenever a watcher (re)subscribes, and every REFRESH_S anyway:
a lost notification delays an entry, never loses it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, cast

import redis
import trio

from actors.adapters.redis.events import translate
from actors.adapters.redis.streams import (
    CONNECTION_FAULTS,
    RespConnection,
    stream_refusal,
    streams_at_fault,
)
from actors.backoff import Backoff
from actors.errors import PermanentError, StreamsRefused, TransientError
from messages.ports import Entry, is_entry_id

log = logging.getLogger("chat_actors.gateway.cluster")

CHANNEL = "__keyspace@0__:"  # a cluster has database 0 only
# The primaries are looked up again this often (failovers, resharding), and every
# followed stream is read again, notified or not.
REFRESH_S = 5.0


def ensure_notifications(cluster: Any) -> None:
    """Keyspace notifications for stream commands on every node (a replica promoted in
    a failover must send them too): add K and t where missing. Blocking."""
    for node in cluster.get_nodes():
        where = f"{node.host}:{node.port}"
        try:
            flags = str(cluster.config_get("notify-keyspace-events", target_nodes=node)
                        .get("notify-keyspace-events", ""))
            if "K" in flags and ("t" in flags or "A" in flags):
                continue
            wanted = "".join(dict.fromkeys(flags + "Kt"))
            cluster.config_set("notify-keyspace-events", wanted, target_nodes=node)
        except redis.RedisError as exc:
            raise PermanentError(
                f"redis: the gateway needs keyspace notifications for streams on {where} "
                f"(notify-keyspace-events with K and t, for example \"Kt\"); CONFIG SET "
                f"was refused ({exc}): set it in that server's configuration",
                code="redis") from exc


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class ClusterWatch:
    """Pub/Sub watchers, one per primary; `ClusterReader`s follow streams through it."""

    def __init__(self, cluster: Any, seed: Mapping[str, Any], prefix: str) -> None:
        self._cluster = cluster
        self._seed = dict(seed)  # password, username, TLS: the same for every node
        self._pattern = CHANNEL + _glob_escape(prefix) + "*"
        self._followers: dict[str, ClusterReader] = {}
        self._watching: dict[tuple[str, int], trio.CancelScope] = {}
        self.notifications = 0

    def follow(self, reader: ClusterReader, keys: Iterable[str]) -> None:
        for key in keys:
            self._followers[key] = reader

    def unfollow(self, reader: ClusterReader, keys: Iterable[str]) -> None:
        for key in keys:
            if self._followers.get(key) is reader:
                del self._followers[key]

    def _touch(self, key: str) -> None:
        reader = self._followers.get(key)
        if reader is not None:
            reader.mark(key)

    def _sweep(self) -> None:
        for key, reader in list(self._followers.items()):
            reader.mark(key)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep one watcher per primary, following failovers, and sweep now and then."""
        async with trio.open_nursery() as nursery:
            started = False
            backoff, failures = Backoff(), 0
            while True:
                try:
                    primaries = await trio.to_thread.run_sync(self._primaries)
                except (TransientError, PermanentError) as exc:
                    failures += 1
                    log.warning("looking up the cluster's primaries failed (%s)", exc)
                    await trio.sleep(backoff.delay(failures))
                    continue
                failures = 0
                for node in primaries:
                    if node not in self._watching:
                        self._watching[node] = await nursery.start(self._watch, node)
                for node in [n for n in self._watching if n not in primaries]:
                    self._watching.pop(node).cancel()  # no longer a primary
                if not started:
                    started = True
                    task_status.started()
                self._sweep()
                await trio.sleep(REFRESH_S)

    def _primaries(self) -> set[tuple[str, int]]:
        try:
            self._cluster.nodes_manager.initialize()
            ensure_notifications(self._cluster)
            return {(node.host, int(node.port)) for node in self._cluster.get_primaries()}
        except redis.RedisError as exc:
            raise translate(exc) from exc

    async def _watch(self, node: tuple[str, int],
                     task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            reported = False  # started: once listening, or once it failed (not blocked)
            backoff, failures = Backoff(), 0
            while True:
                conn = RespConnection({**self._seed, "host": node[0], "port": node[1],
                                       "db": 0})
                try:
                    await conn.connect()
                    await conn.call("PSUBSCRIBE", self._pattern)
                    failures = 0
                    self._sweep()  # what was appended while nobody listened
                    if not reported:
                        reported = True
                        task_status.started(scope)
                    while True:
                        self._message(await conn.reply())
                except (*CONNECTION_FAULTS, TransientError, PermanentError) as exc:
                    failures += 1
                    log.warning("watching %s:%d failed (%s); again in a moment",
                                node[0], node[1], exc)
                finally:
                    conn.drop()
                if not reported:
                    reported = True
                    task_status.started(scope)
                self._sweep()
                await trio.sleep(backoff.delay(failures))
                if failures > 2:
                    self._watching.pop(node, None)  # the next lookup decides
                    return

    def _message(self, message: Any) -> None:
        """["pmessage", pattern, "__keyspace@0__:<key>", "<command>"]; others ignored."""
        if (isinstance(message, list) and len(cast(list[Any], message)) == 4
                and message[0] == "pmessage" and isinstance(message[2], str)
                and message[2].startswith(CHANNEL)):
            self.notifications += 1
            if message[3] == "xadd":
                self._touch(message[2][len(CHANNEL):])


class ClusterReader:
    """The relay's Reader on a cluster: waits for a followed stream to be appended to
    (or to be new to it), then reads those streams, one XREAD each, pipelined."""

    def __init__(self, watch: ClusterWatch, cluster: Any) -> None:
        self._watch = watch
        self._cluster = cluster
        self._following: set[str] = set()  # the streams of the last read
        self._dirty: set[str] = set()
        self._given: dict[str, str] = {}  # where each stream was last read after
        self._changed = trio.Event()
        self._unblocked = False

    def mark(self, key: str) -> None:
        self._dirty.add(key)
        self._changed.set()

    async def read(self, streams: Mapping[str, str], count: int,
                   block_ms: int) -> list[tuple[str, list[Entry]]]:
        # Only the streams asked for now: one no client follows any more is forgotten.
        keys = set(streams)
        self._watch.follow(self, keys - self._following)
        self._watch.unfollow(self, self._following - keys)
        self._following = keys
        self._dirty &= keys
        for key in [k for k in self._given if k not in keys]:
            del self._given[key]
        with trio.move_on_after(block_ms / 1000):
            while not self._unblocked:
                due = {key: after for key, after in streams.items()
                       if key in self._dirty or self._given.get(key) != after}
                if due:
                    self._dirty.difference_update(due)
                    try:
                        found = await trio.to_thread.run_sync(self._read_each, due, count)
                    except StreamsRefused as exc:
                        self._settle(due, exc.found, refused=exc.refused)
                        raise
                    except BaseException:
                        self._dirty.update(due)  # not read after all: read them next time
                        raise
                    self._settle(due, found)
                    if found:
                        return found
                    continue
                self._changed = trio.Event()
                await self._changed.wait()
        self._unblocked = False
        return []

    def _settle(self, due: Mapping[str, str], found: list[tuple[str, list[Entry]]],
                refused: Iterable[str] = ()) -> None:
        """Where each stream of `due` now stands: after its last entry found, or where it
        was read from. A refused stream has not been read: asked again, it is due."""
        for key, entries in found:
            self._given[key] = entries[-1][0]
        for key in due.keys() - {key for key, _ in found}:
            self._given[key] = due[key]
        for key in refused:
            self._given.pop(key, None)

    def _read_each(self, due: Mapping[str, str], count: int) -> list[tuple[str, list[Entry]]]:
        """One XREAD per stream, pipelined per node. A stream whose own read is refused
        (its key holds another type, Redis refuses its position) does not fail the
        others: StreamsRefused names it with what the others found. A connection or
        server-state error, or one every stream got alike, fails the whole read
        (retried for all)."""
        try:
            pipe = self._cluster.pipeline(transaction=False)
            for key, after in due.items():
                pipe.xread({key: after}, count=count)
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            raise translate(exc) from exc
        found: list[tuple[str, list[Entry]]] = []
        refused: dict[str, str] = {}
        for key, reply in zip(due, replies, strict=True):
            if isinstance(reply, Exception):
                refused[key] = _refusal(reply)
                continue
            entries = _entries(key, reply)
            if entries:
                found.append((key, entries))
        if streams_at_fault(refused, len(due)):
            raise StreamsRefused(refused, found)
        if refused:
            raise PermanentError(f"redis: XREAD: {next(iter(refused.values()))}", code="redis")
        return found

    def unblock(self) -> None:
        """The relay's streams changed: the read in flight returns [] (from a thread)."""
        trio.from_thread.run_sync(self._wake)

    def _wake(self) -> None:
        self._unblocked = True
        self._changed.set()

    def close(self) -> None:
        self._watch.unfollow(self, self._following)


def _refusal(reply: Exception) -> str:
    """Why one stream's own XREAD failed (redis_streams.stream_refusal); a failure that
    is no Redis reply is raised, for the whole read."""
    if not isinstance(reply, redis.RedisError):
        raise PermanentError(f"redis: XREAD failed: {type(reply).__name__}: {reply}",
                             code="redis") from reply
    return stream_refusal(reply)


def _entries(key: str, reply: Any) -> list[Entry]:
    """redis-py's XREAD reply for one stream ([[key, [(id, fields), ...]]] or empty),
    checked: another shape is a PermanentError naming what was wrong."""
    if not reply:
        return []
    if not (isinstance(reply, list) and len(cast(list[Any], reply)) == 1
            and isinstance(reply[0], list | tuple) and len(reply[0]) == 2):
        raise PermanentError(f"redis: XREAD of {key!r} replied in an unknown shape",
                             code="redis")
    entries: list[Entry] = []
    for item in cast(list[Any], reply[0][1]):
        if not (isinstance(item, list | tuple) and len(item) == 2
                and isinstance(item[0], str) and is_entry_id(item[0])
                and isinstance(item[1], dict | None)):
            raise PermanentError(f"redis: an entry of {key!r} is not (id, fields)",
                                 code="redis")
        fields = cast(dict[Any, Any], item[1] or {})
        entries.append((item[0], {str(k): str(v) for k, v in fields.items()}))
    return entries
