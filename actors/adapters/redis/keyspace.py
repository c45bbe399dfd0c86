"""Keyspace notifications tell the gateway which streams grew.

A server asked for keyspace notifications of stream commands (`notify-keyspace-events`
with K and t; set by the gateway at start when allowed) publishes the key of every
stream appended to. One Pub/Sub connection per primary (one on a single Redis or
behind Sentinel, one per primary of a Cluster) learns which followed streams were
appended to, and the relay then reads only those. Pub/Sub delivers at most once, so
every stream is read again whenever a watcher (re)subscribes, and every REFRESH_S
anyway: a lost notification delays an entry, never loses it.

On a Cluster this is the only way: a blocking XREAD may name only streams of one hash
slot, and each job's stream has a slot of its own ({job_id} is its hash tag). The
`ClusterReader` reads the streams that grew with one XREAD each, pipelined per node.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Hashable, Mapping
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

log = logging.getLogger("chat_actors.gateway.keyspace")

# The primaries are looked up again this often (failovers, resharding), and every
# followed stream is read again, notified or not.
REFRESH_S = 5.0


def _wanted_flags(flags: str) -> str | None:
    """The flags to set so stream commands are notified by key, or None if they are."""
    if "K" in flags and ("t" in flags or "A" in flags):
        return None
    return "".join(dict.fromkeys(flags + "Kt"))


def _refused(where: str, exc: Exception) -> PermanentError:
    return PermanentError(
        f"redis: the gateway needs keyspace notifications for streams on {where} "
        f"(notify-keyspace-events with K and t, for example \"Kt\"); CONFIG SET "
        f"was refused ({exc}): set it in that server's configuration", code="redis")


def ensure_notifications(cluster: Any) -> None:
    """Keyspace notifications for stream commands on every node of a Cluster (a replica
    promoted in a failover must send them too): add K and t where missing. Blocking."""
    for node in cluster.get_nodes():
        where = f"{node.host}:{node.port}"
        try:
            flags = str(cluster.config_get("notify-keyspace-events", target_nodes=node)
                        .get("notify-keyspace-events", ""))
            wanted = _wanted_flags(flags)
            if wanted is not None:
                cluster.config_set("notify-keyspace-events", wanted, target_nodes=node)
        except redis.RedisError as exc:
            raise _refused(where, exc) from exc


def ensure_node_notifications(client: Any, where: str) -> None:
    """The same on the one server `client` talks to (a single Redis, or the primary
    Sentinel names). Blocking."""
    try:
        flags = str(client.config_get("notify-keyspace-events")
                    .get("notify-keyspace-events", ""))
        wanted = _wanted_flags(flags)
        if wanted is not None:
            client.config_set("notify-keyspace-events", wanted)
    except redis.ResponseError as exc:  # refused (a connection fault is raised as it is)
        raise _refused(where, exc) from exc


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class KeyspaceWatch:
    """Pub/Sub watchers, one per primary `lookup` names (blocking: {node: where to
    connect}, asked again every REFRESH_S); each notified key goes to `touch`, and
    `sweep` is called whenever a notification may have been missed."""

    def __init__(self, lookup: Callable[[], Mapping[Hashable, Mapping[str, Any]]],
                 prefix: str, touch: Callable[[str], None], sweep: Callable[[], None]) -> None:
        self._lookup = lookup
        self._prefix = prefix
        self._touch = touch
        self._sweep = sweep
        self._watching: dict[Hashable, trio.CancelScope] = {}
        self.notifications = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep one watcher per primary, following failovers, and sweep now and then."""
        async with trio.open_nursery() as nursery:
            started = False
            backoff, failures = Backoff(), 0
            while True:
                try:
                    primaries = await trio.to_thread.run_sync(self._lookup)
                except (TransientError, PermanentError) as exc:
                    failures += 1
                    log.warning("looking up the primaries to watch failed (%s)", exc)
                    self._sweep()  # unwatched: every stream is read now and then anyway
                    await trio.sleep(min(backoff.delay(failures), REFRESH_S))
                    continue
                failures = 0
                for node, target in primaries.items():
                    if node not in self._watching:
                        self._watching[node] = await nursery.start(self._watch, node, target)
                for node in [n for n in self._watching if n not in primaries]:
                    self._watching.pop(node).cancel()  # no longer a primary
                if not started:
                    started = True
                    task_status.started()
                self._sweep()
                await trio.sleep(REFRESH_S)

    async def _watch(self, node: Hashable, target: Mapping[str, Any],
                     task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        channel = f"__keyspace@{int(target.get('db') or 0)}__:"
        pattern = channel + _glob_escape(self._prefix) + "*"
        with trio.CancelScope() as scope:
            reported = False  # started: once listening, or once it failed (not blocked)
            backoff, failures = Backoff(), 0
            while True:
                conn = RespConnection(target)
                try:
                    await conn.connect()
                    await conn.call("PSUBSCRIBE", pattern)
                    failures = 0
                    self._sweep()  # what was appended while nobody listened
                    if not reported:
                        reported = True
                        task_status.started(scope)
                    while True:
                        self._messages(channel, await conn.pushed())
                except (*CONNECTION_FAULTS, TransientError, PermanentError) as exc:
                    failures += 1
                    log.warning("watching %s failed (%s); again in a moment", node, exc)
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

    def _messages(self, channel: str, messages: list[Any]) -> None:
        """["pmessage", pattern, "__keyspace@<db>__:<key>", "<command>"]: the key of each
        XADD goes to `touch`; any other message is ignored. (One per relayed event.)"""
        cut, touch = len(channel), self._touch
        for message in messages:
            if (message.__class__ is list and len(message) == 4  # as streams.xread_reply
                    and message[0] == "pmessage" and message[2].__class__ is str
                    and message[2].startswith(channel)):
                self.notifications += 1
                if message[3] == "xadd":
                    touch(message[2][cut:])


def cluster_primaries(cluster: Any, seed: Mapping[str, Any]) -> dict[Hashable, dict[str, Any]]:
    """A Cluster's primaries, each with notifications on, as KeyspaceWatch looks them up
    (`seed`: password, username, TLS, the same for every node). Blocking."""
    try:
        cluster.nodes_manager.initialize()
        ensure_notifications(cluster)
        return {(node.host, int(node.port)): {**seed, "host": node.host, "port": int(node.port),
                                              "db": 0}
                for node in cluster.get_primaries()}
    except redis.RedisError as exc:
        raise translate(exc) from exc


def node_primary(locate: Callable[[], Mapping[str, Any]],
                 control: Any) -> dict[Hashable, dict[str, Any]]:
    """The one primary of a single Redis or of Sentinel, with notifications on. Blocking."""
    try:
        target = dict(locate())
        where = str(target.get("path") or f"{target.get('host')}:{target.get('port')}")
        ensure_node_notifications(control, where)
    except redis.RedisError as exc:
        raise translate(exc) from exc
    return {where: target}


class ClusterReader:
    """The relay's NowReader on a Cluster: the streams it is told grew, one XREAD each,
    pipelined per node (in a thread: redis-py's cluster client is synchronous)."""

    def __init__(self, cluster: Any) -> None:
        self._cluster = cluster

    async def read_now(self, streams: Mapping[str, str],
                       count: int) -> list[tuple[str, list[Entry]]]:
        return await trio.to_thread.run_sync(self._read_each, streams, count)

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

    def close(self) -> None:
        pass  # the cluster client is the gateway's, closed with its reads


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
