"""The gateway on a real Redis Cluster (three primaries, a replica each, on loopback).

Job streams are written straight to the cluster (one slot per job, as the worker
writes them), so what is tested is the gateway's side: it turns keyspace
notifications on, one watcher per primary learns which streams grew, and each client
gets its whole stream in order; a notification that never comes only delays an
entry; and when a primary is killed mid-stream and its replica takes over, the
watchers follow and the streams go on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trio

from actors.adapters.redis import keyspace as redis_keyspace
from actors.adapters.redis.keyspace import ClusterReader
from actors.errors import StreamsRefused
from gateway.app import OWNER_PREFIX, uuid7
from tests.helpers import gateway_running
from tests.test_gateway import bearer, parse_sse
from tests.test_relay import follow as follow_text
from tools import local_stack


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[local_stack.Service], redis.RedisCluster]]:
    nodes = local_stack.start_redis_cluster(tmp_path)
    client = redis.RedisCluster.from_url(nodes[0].url, decode_responses=True)
    try:
        yield nodes, client
    finally:
        client.close()
        for node in nodes:
            node.stop()


def cluster_config(gw_config: Any, nodes: list[local_stack.Service]) -> Any:
    return gw_config(CHAT_ACTORS__REDIS__URL=nodes[0].url, CHAT_ACTORS__REDIS__CLUSTER="true")


def append(client: redis.RedisCluster, stream: str, job_id: str, event: str, seq: int,
           data: dict[str, Any]) -> str:
    return str(client.xadd(stream, {"event": event, "jobId": job_id, "userId": "alice",
                                    "sessionId": "s", "attempt": 1, "seq": seq, "ts": 0,
                                    "data": json.dumps(data)}))


def new_job(client: redis.RedisCluster, config: Any) -> tuple[str, str]:
    job_id = uuid7()
    client.set(OWNER_PREFIX + job_id, "alice", ex=600)
    stream = config.job_keys(job_id).stream
    append(client, stream, job_id, "started", 0, {"model": "m"})
    return job_id, stream


async def follow(http: httpx.AsyncClient, job_id: str, into: dict[str, list[dict[str, Any]]],
                 *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Read the job's events to `done` (to the end: no half-read response is left);
    started once its `started` event has arrived."""
    texts: dict[str, str] = {}
    await follow_text(http, job_id, "alice", texts, task_status=task_status)
    into[job_id] = parse_sse(texts[job_id])


def texts(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"]["text"] for e in events if e["event"] == "token")


async def test_the_gateway_relays_every_stream_of_a_cluster(gw_config, cluster, monkeypatch):
    monkeypatch.setattr(redis_keyspace, "REFRESH_S", 3600)  # notifications alone
    nodes, client = cluster
    config = cluster_config(gw_config, nodes)
    jobs = [new_job(client, config) for _ in range(24)]  # slots on every primary
    got: dict[str, list[dict[str, Any]]] = {}
    with trio.fail_after(60):
        await relay_all(config, client, jobs, got)
    for job_id, _ in jobs:
        seqs = [e["data"]["seq"] for e in got[job_id]]
        assert seqs == list(range(32)), f"{job_id}: {seqs}"
        assert texts(got[job_id]) == "".join(f"{n} " for n in range(1, 31))


async def relay_all(config: Any, client: redis.RedisCluster, jobs: list[tuple[str, str]],
                    got: dict[str, list[dict[str, Any]]]) -> None:
    async with gateway_running(config) as (handle, http), trio.open_nursery() as nursery:
        for node in client.get_nodes():  # the gateway turned them on, replicas too
            flags = client.config_get("notify-keyspace-events", target_nodes=node)
            assert {"K", "t"} <= set(flags["notify-keyspace-events"]) or "A" in flags[
                "notify-keyspace-events"]
        for job_id, _ in jobs:
            await nursery.start(follow, http, job_id, got)

        def write() -> None:  # in a thread: the gateway runs on this event loop
            for n in range(1, 31):
                for job_id, stream in jobs:
                    append(client, stream, job_id, "token", n, {"text": f"{n} "})
            for job_id, stream in jobs:
                append(client, stream, job_id, "done", 31, {"status": "succeeded"})

        await trio.to_thread.run_sync(write)
        assert handle.gateway.relay.readers() == 1  # a read names only the streams that grew


async def test_a_notification_that_never_comes_only_delays_the_entry(gw_config, cluster,
                                                                      monkeypatch):
    monkeypatch.setattr(redis_keyspace, "REFRESH_S", 0.3)
    nodes, client = cluster
    config = cluster_config(gw_config, nodes)
    job_id, stream = new_job(client, config)
    got: dict[str, list[dict[str, Any]]] = {}
    with trio.fail_after(30):
        async with gateway_running(config) as (_, http), trio.open_nursery() as nursery:
            await nursery.start(follow, http, job_id, got)
            # Notifications off from here on (and not turned on again): entries written
            # now are found by the sweep alone.
            monkeypatch.setattr(redis_keyspace, "ensure_notifications", lambda _: None)
            for node in client.get_nodes():
                client.config_set("notify-keyspace-events", "", target_nodes=node)
            append(client, stream, job_id, "token", 1, {"text": "silent "})
            append(client, stream, job_id, "done", 2, {"status": "succeeded"})
    assert [e["event"] for e in got[job_id]] == ["started", "token", "done"]


async def test_streams_go_on_after_a_primary_fails_over_to_its_replica(gw_config, cluster):
    nodes, client = cluster
    config = cluster_config(gw_config, nodes)
    jobs = [new_job(client, config) for _ in range(12)]
    victim = client.get_node_from_key(jobs[0][1])
    got: dict[str, list[dict[str, Any]]] = {}
    async with gateway_running(config) as (_, http), trio.open_nursery() as nursery:
        for job_id, _ in jobs:
            await nursery.start(follow, http, job_id, got)
        for job_id, stream in jobs:
            append(client, stream, job_id, "token", 1, {"text": "before "})
        for node in client.get_primaries():
            client.execute_command("WAIT", 1, 2000, target_nodes=node)  # on the replicas
        (killed,) = [n for n in nodes if n.port == int(victim.port)]
        killed.stop()

        def after_failover() -> None:
            # Writes fail until the replica is promoted (the cluster client then finds
            # it by itself): each is retried until it lands, within a minute.
            for job_id, stream in jobs:
                for seq, event, data in ((2, "token", {"text": "after"}),
                                         (3, "done", {"status": "succeeded"})):
                    deadline = time.monotonic() + 60
                    while True:
                        try:
                            append(client, stream, job_id, event, seq, data)
                            break
                        except redis.RedisError:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.1)  # the failover is the cluster's to finish

        await trio.to_thread.run_sync(after_failover)
    for job_id, _ in jobs:
        assert texts(got[job_id]) == "before after", job_id
        assert [e["data"]["seq"] for e in got[job_id]] == [0, 1, 2, 3]


async def test_a_stream_the_cluster_refuses_ends_only_its_client(gw_config, cluster):
    """A stream Redis refuses to read (a key of another type; a position past 2^64-1,
    set below the HTTP check) fails alone: its client gets `event: error`
    (stream_read) and its response ends, while the reader's other streams go on."""
    nodes, client = cluster
    config = cluster_config(gw_config, nodes)
    job_id, stream = new_job(client, config)
    _, other = new_job(client, config)
    wrong = uuid7()
    client.set(OWNER_PREFIX + wrong, "mallory", ex=600)
    client.rpush(config.job_keys(wrong).stream, "not a stream")
    # The cluster reader itself: one XREAD per stream, pipelined per node.
    reader = ClusterReader(client)
    with pytest.raises(StreamsRefused) as refused:
        await reader.read_now({stream: "0-0", other: "99999999999999999999-0",
                               config.job_keys(wrong).stream: "0-0"}, 10)
    reasons = refused.value.refused
    assert set(reasons) == {other, config.job_keys(wrong).stream}
    assert "Invalid stream ID" in reasons[other]
    assert reasons[config.job_keys(wrong).stream].startswith("WRONGTYPE")
    assert [(key, len(entries)) for key, entries in refused.value.found] == [(stream, 1)]
    # Through the gateway: alice's stream and mallory's on the same reader.
    got: dict[str, list[dict[str, Any]]] = {}
    async with gateway_running(config) as (handle, http), trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await nursery.start(follow, http, job_id, got)
            text = ""
            async with http.stream("GET", f"/v1/jobs/{wrong}/events",
                                   headers=bearer("mallory")) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_text():
                    text += chunk
            error = text.split("\n\n")[-2].splitlines()
            assert error[0] == "event: error", text
            data = json.loads(error[1].removeprefix("data: "))
            assert data["code"] == "stream_read" and data["retryable"] is False
            assert handle.gateway.relay.readers() == 1

            def write() -> None:
                for n in range(1, 11):
                    append(client, stream, job_id, "token", n, {"text": f"{n} "})
                append(client, stream, job_id, "done", 11, {"status": "succeeded"})

            await trio.to_thread.run_sync(write)
    assert [e["data"]["seq"] for e in got[job_id]] == list(range(12))
    assert texts(got[job_id]) == "".join(f"{n} " for n in range(1, 11))
