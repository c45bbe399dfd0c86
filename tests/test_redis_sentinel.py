"""The worker and the gateway on Redis Sentinel (a primary, its replica and three
sentinels on loopback, redis.url = redis+sentinel://...): jobs stream through the
primary the sentinels name, each job's end is WAITed onto the replica, and when the
primary is killed mid-answer the sentinels promote the replica, the worker's writes
and the gateway's readers follow, and a client reading through the gateway can rely
on the contract (seq never repeats or goes back, one `done`, `final.text` whole)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from actors.adapters.redis.streams import BlockingReader, StreamReads
from actors.errors import PermanentError, TransientError
from tests.helpers import events_of, gateway_running, produce, request, wait_calls, worker_running
from tests.scripted_llm import Reply
from tests.test_gateway import bearer
from tests.test_gateway_cluster import follow
from tests.test_worker_cluster import TOKENS, assert_failover_contract, waits
from tools import local_stack


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[local_stack.SentinelSet]:
    started = local_stack.start_redis_sentinel(tmp_path)
    try:
        yield started
    finally:
        started.stop()


def on(node: local_stack.Service) -> redis.Redis:
    return redis.Redis(port=node.port, decode_responses=True)


async def test_jobs_stream_through_the_named_primary_and_their_end_waits_for_its_replica(
        make_config, llm, sentinels):
    llm.default = Reply(tokens=("Watched", " by", " sentinels", "."))
    config, _ = make_config(environ={"CHAT_ACTORS__REDIS__URL": sentinels.url})
    req = request("Who decides?")
    with on(sentinels.primary) as primary, on(sentinels.replica) as replica:
        before = waits(primary)
        async with worker_running(config):
            produce(config, req)
            events = await events_of(primary, config, req["jobId"])
        assert [e["event"] for e in events][-2:] == ["final", "done"]
        assert events[-2]["data"]["text"] == "Watched by sentinels."
        assert waits(primary) > before
        # WAIT returned with the replica's acknowledgement: the end is on the replica.
        last = replica.xrevrange(config.job_keys(req["jobId"]).stream, count=1)
        assert last and last[0][1]["event"] == "done"


async def test_a_primary_killed_mid_answer_fails_over_and_a_gateway_client_sees_the_contract(
        gw_config, llm, sentinels, db):
    config = gw_config(CHAT_ACTORS__REDIS__URL=sentinels.url)
    llm.default = Reply(tokens=TOKENS, token_delay_s=0.05)
    got: dict[str, list[dict[str, Any]]] = {}
    async with worker_running(config), gateway_running(config) as (_, http):
        accepted = await http.post("/v1/chat", headers=bearer(),
                                   json={"sessionId": "s-sentinel", "message": "Count on"})
        assert accepted.status_code == 202
        job_id = accepted.json()["jobId"]
        with trio.fail_after(120):  # the client's stream ends, or the test fails
            async with trio.open_nursery() as nursery:
                await nursery.start(follow, http, job_id, got)
                await wait_calls(llm, lambda calls: calls and calls[0].tokens_sent >= 10)
                mid_answer = llm.calls[0].tokens_sent
                sentinels.primary.process.kill()  # no shutdown: what it had not sent is lost
                sentinels.primary.process.wait()
                killed_at = time.monotonic()
                await trio.to_thread.run_sync(lambda: _promoted(sentinels))
                print(f"replica promoted {time.monotonic() - killed_at:.1f} s after the kill")
        assert mid_answer < len(TOKENS)
    seen = got[job_id]
    assert_failover_contract(seen, "".join(TOKENS))
    assert len({e["data"]["attempt"] for e in seen}) == 1
    # The stream on the new primary, as a client reconnecting from scratch would read it.
    with on(sentinels.replica) as promoted:
        entries = await events_of(promoted, config, job_id)
    assert_failover_contract(entries, "".join(TOKENS))
    row = db.execute("SELECT status FROM llm_jobs WHERE job_id = %s", (job_id,)).fetchone()
    assert row == ("completed",)


def _promoted(sentinels: local_stack.SentinelSet, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    with on(sentinels.replica) as replica:
        while replica.execute_command("ROLE")[0] != "master":
            assert time.monotonic() < deadline, "the sentinels promoted no replica"
            time.sleep(0.1)  # the sentinels' to decide: nothing to wait on but the role


async def test_the_gateway_reader_refuses_a_server_that_is_not_the_primary(sentinels):
    replica = {"host": "127.0.0.1", "port": sentinels.replica.port}
    with on(sentinels.replica) as control:
        refused = BlockingReader(lambda: replica, control, primary_only=True)
        with pytest.raises(TransientError, match="is not the primary"):
            await refused.read({"any": "0-0"}, 10, 10)
        refused.close()
        # Without Sentinel a URL naming a replica is the operator's choice: it is read.
        plain = BlockingReader(lambda: replica, control)
        assert await plain.read({"any": "0-0"}, 10, 10) == []
        plain.close()


def test_the_chat_client_finds_the_primary_through_the_sentinels(make_config, sentinels):
    from tools.chat_client import ChatClient

    config, _ = make_config(environ={"CHAT_ACTORS__REDIS__URL": sentinels.url})
    with on(sentinels.primary) as primary:
        stream = config.job_keys("job-by-sentinel").stream
        primary.xadd(stream, {"event": "done", "jobId": "job-by-sentinel", "data": "{}"})
    client = ChatClient(config)
    try:
        assert list(client.events("job-by-sentinel", timeout_s=10)) == [("done", {})]
    finally:
        client.close()


async def test_the_passwords_of_the_primary_and_the_sentinels_come_from_the_environment(
        tmp_path, make_config, monkeypatch):
    guarded = local_stack.start_redis_sentinel(tmp_path, password="data-pw-7f3",
                                               sentinel_password="sentinel-pw-2c9")
    try:
        monkeypatch.setenv("T_REDIS_PW", "data-pw-7f3")
        monkeypatch.setenv("T_SENTINEL_PW", "sentinel-pw-2c9")
        both = {"CHAT_ACTORS__REDIS__URL": guarded.url,
                "CHAT_ACTORS__REDIS__PASSWORD_ENV": "T_REDIS_PW",
                "CHAT_ACTORS__REDIS__SENTINEL_PASSWORD_ENV": "T_SENTINEL_PW"}
        config, _ = make_config(environ=both)
        reads = StreamReads(config.redis)
        reader = reads.reader()
        try:
            await reads.remember_owner("pw-test", "alice", 60)  # request/reply
            assert await reader.read({"pw-stream": "0-0"}, 10, 10) == []  # our own reader
            assert reads.primary()["port"] == guarded.primary.port
        finally:
            reader.close()
            reads.close()
        # The sentinels' password missing: no primary can be found, and the error says why.
        config, _ = make_config(environ={**both, "CHAT_ACTORS__REDIS__SENTINEL_PASSWORD_ENV": ""})
        reads = StreamReads(config.redis)
        try:
            with pytest.raises(TransientError, match=r"No master found for 'chat' : sentinel "
                               r"127\.0\.0\.1:\d+ - \S*AuthenticationError") as failed:
                await reads.ping()
            assert len(str(failed.value)) < 400  # each sentinel by its address, not its repr
        finally:
            reads.close()
        # The primary's password wrong: refused by the primary itself.
        monkeypatch.setenv("T_REDIS_PW", "wrong")
        config, _ = make_config(environ=both)
        reads = StreamReads(config.redis)
        try:
            with pytest.raises((TransientError, PermanentError), match="(?i)password|auth"):
                await reads.ping()
        finally:
            reads.close()
    finally:
        guarded.stop()
