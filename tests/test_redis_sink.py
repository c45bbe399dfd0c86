"""redis_sink logic with a fake writer port and the autojump MockClock."""

from __future__ import annotations

import json
import uuid
from functools import partial

import pytest
import trio
import trio.testing

from actors.errors import PermanentError, TransientError
from actors.redis_sink import coalesce, run_redis_sink
from messages.mailboxes import EventEmitted, JobRef, Receipt
from messages.wire import Done, Reasoning, Started, Token

JOB = JobRef(job_id="j", user_id="u", session_id="s", attempt=1, stream_key="sse:chat:j")
OTHER = JobRef(job_id="k", user_id="u", session_id="s", attempt=1, stream_key="sse:chat:k")


class FakeWriter:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.written: list = []

    async def write(self, entries):
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise TransientError("redis: connection refused")
        self.written.extend(entries)
        return set()

    async def done_recorded(self, job_id):
        return False

    async def last_seq(self, job_id, attempt):
        return -1


async def test_adjacent_tokens_of_a_job_coalesce_and_seq_counts_entries(autojump_clock):
    writer = FakeWriter()
    send, receive = trio.open_memory_channel(100)
    receipt = Receipt()
    async with trio.open_nursery() as nursery:
        # Queue everything before the sink starts: they all land in one batch.
        for message in [
            EventEmitted(job=JOB, body=Started(model="m", mode="gen", attempt=1)),
            EventEmitted(job=JOB, body=Token(text="Hel")),
            EventEmitted(job=OTHER, body=Token(text="x")),
            EventEmitted(job=JOB, body=Token(text="lo")),
            EventEmitted(job=JOB, body=Done(status="completed", partial=False), receipt=receipt),
        ]:
            send.send_nowait(message)
        send.close()
        await nursery.start(partial(run_redis_sink, receive, writer, batch_max=64))
    assert receipt.is_set()
    mine = [e.event for e in writer.written if e.event.job_id == "j"]
    assert [(e.event, e.seq) for e in mine] == [("started", 0), ("token", 1), ("done", 2)]
    assert json.loads(mine[1].data) == {"text": "Hello"}
    assert [json.loads(e.event.data) for e in writer.written if e.event.job_id == "k"] == [
        {"text": "x"}]


def test_reasoning_coalesces_apart_from_tokens():
    """Adjacent reasoning merges like tokens do, but a run of one kind never absorbs
    the other: the client sees reasoning and answer in the order they came."""
    bodies = [Reasoning(text="Think"), Reasoning(text="ing."), Token(text="An"),
              Token(text="swer"), Reasoning(text=" again"), Token(text="!")]
    entries = coalesce([EventEmitted(job=JOB, body=b) for b in bodies], {})
    assert [(e.event.event, json.loads(e.event.data)["text"], e.event.seq) for e in entries] == [
        ("reasoning", "Thinking.", 0), ("token", "Answer", 1), ("reasoning", " again", 2),
        ("token", "!", 3)]


def test_a_restart_in_the_worker_numbers_the_new_attempt_from_0_and_forgets_the_old():
    """An answer started over inside the worker is the job's next attempt: its entries
    count from 0, and the sink keeps no count of the attempt before it (no growth per
    restart in a long-running worker)."""
    again = JobRef(job_id="j", user_id="u", session_id="s", attempt=2, stream_key="sse:chat:j")
    counts: dict[tuple[str, int], int] = {}
    first = coalesce([EventEmitted(job=JOB, body=Started(model="m", mode="gen", attempt=1)),
                      EventEmitted(job=JOB, body=Token(text="The"))], counts)
    second = coalesce([EventEmitted(job=again, body=Started(model="m", mode="gen", attempt=2)),
                       EventEmitted(job=again, body=Token(text="Hi"))], counts)
    assert [(e.event.attempt, e.event.seq) for e in [*first, *second]] == [
        (1, 0), (1, 1), (2, 0), (2, 1)]
    assert counts == {("j", 2): 2}


async def test_transient_failures_are_retried_with_backoff_and_nothing_is_lost(autojump_clock):
    writer = FakeWriter(failures=3)
    send, receive = trio.open_memory_channel(10)
    receipt = Receipt()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_redis_sink, receive, writer, batch_max=64))
        started = trio.current_time()
        await send.send(EventEmitted(job=JOB, body=Done(status="completed", partial=False),
                                     receipt=receipt))
        await receipt.wait()
        waited = trio.current_time() - started
        send.close()
    assert writer.calls == 4
    assert [e.event.event for e in writer.written] == ["done"]
    assert waited > 0  # it backed off (virtual time) instead of spinning


class RefusingWriter(FakeWriter):
    """Redis refuses job k's entries for good (say a key of another type is in the way)."""

    async def write(self, entries):
        if any(e.event.job_id == "k" for e in entries):
            raise PermanentError("redis: ResponseError: WRONGTYPE", code="redis")
        self.written.extend(entries)
        return set()


async def test_an_entry_redis_refuses_for_good_is_dropped_and_the_sink_goes_on(autojump_clock):
    writer = RefusingWriter()
    send, receive = trio.open_memory_channel(10)
    mine, theirs, later = Receipt(), Receipt(), Receipt()
    async with trio.open_nursery() as nursery:
        send.send_nowait(EventEmitted(job=JOB, body=Token(text="a"), receipt=mine))
        send.send_nowait(EventEmitted(job=OTHER, body=Token(text="b"), receipt=theirs))
        await nursery.start(partial(run_redis_sink, receive, writer, batch_max=64))
        await send.send(EventEmitted(job=JOB, body=Done(status="completed", partial=False),
                                     receipt=later))
        await later.wait()
        send.close()
    assert mine.is_set() and theirs.is_set()
    assert [(e.event.job_id, e.event.event) for e in writer.written] == [
        ("j", "token"), ("j", "done")]


def test_redis_appends_only_for_the_attempt_that_holds_the_job(stack):
    # Attempt 1 of a job froze; attempt 2 took it over and said `started`. Attempt 1's
    # late events (tokens, its `done`) must not reach the client's stream (contract 6.11),
    # and only an appended `done` arms the done marker.
    from actors.adapters.redis.events import RedisEvents
    from config import Redis, job_keys
    from messages.ports import StreamEntry
    from messages.wire import StreamEvent, event_data, now_ms

    job_id = "fenced-job"
    keys = job_keys("sse:chat:{job_id}", job_id, cluster=False)
    events = RedisEvents(Redis(url=stack.redis.url, password_env="", socket_timeout_s=10.0),
                         maxlen=1000, ttl_s=60,
                         keys=lambda job: job_keys("sse:chat:{job_id}", job, cluster=False))
    key = keys.stream

    def entry(attempt: int, seq: int, body) -> StreamEntry:
        return StreamEntry(key=key, event=StreamEvent(
            event=body.EVENT, job_id=job_id, user_id="u", session_id="s", attempt=attempt,
            seq=seq, ts=now_ms(), data=event_data(body)))

    async def scenario() -> list[set[tuple[str, int]]]:
        return [
            await events.write([entry(1, 0, Started(model="m", mode="gen", attempt=1)),
                                entry(1, 1, Token(text="old "))]),
            await events.write([entry(2, 0, Started(model="m", mode="gen", attempt=2))]),
            await events.write([entry(1, 2, Token(text="late")),
                                entry(1, 3, Done(status="completed", partial=False))]),
            await events.write([entry(2, 1, Token(text="new")),
                                entry(2, 2, Done(status="completed", partial=False))]),
            # A redelivery that found the row terminal re-sends the `done` it thought
            # lost, while the owner's own was on its way: one `done` per job, still.
            await events.write([entry(2, 3, Done(status="completed", partial=False))]),
        ]

    import redis

    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    client.delete(key, keys.done, keys.attempt, keys.seq(1), keys.seq(2))
    results = trio.run(scenario)
    assert results == [set(), set(), {(job_id, 1)}, set(), set()]
    stream = [(f["attempt"], f["event"]) for _, f in client.xrange(key)]
    assert stream == [("1", "started"), ("1", "token"), ("2", "started"), ("2", "token"),
                      ("2", "done")]
    assert client.exists(keys.done) and client.ttl(key) > 0
    events.close()
    client.close()


def test_a_redis_that_lost_the_append_script_is_given_it_and_each_entry_lands_once(stack):
    # The writer sends EVALSHA (no SCRIPT EXISTS before each batch): a server without the
    # script (restarted, failed over, SCRIPT FLUSH) must still get every entry, once.
    import redis

    from actors.adapters.redis.events import RedisEvents
    from config import Redis, job_keys
    from messages.ports import StreamEntry
    from messages.wire import StreamEvent, event_data, now_ms

    job_id = f"noscript-{uuid.uuid4().hex[:8]}"
    keys = job_keys("sse:chat:{job_id}", job_id, cluster=False)
    events = RedisEvents(Redis(url=stack.redis.url, password_env="", socket_timeout_s=10.0),
                         maxlen=1000, ttl_s=60,
                         keys=lambda job: job_keys("sse:chat:{job_id}", job, cluster=False))
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)

    def entry(seq: int, body) -> StreamEntry:
        return StreamEntry(key=keys.stream, event=StreamEvent(
            event=body.EVENT, job_id=job_id, user_id="u", session_id="s", attempt=1,
            seq=seq, ts=now_ms(), data=event_data(body)))

    async def scenario() -> None:
        client.script_flush()
        await events.write([entry(0, Started(model="m", mode="gen", attempt=1)),
                            entry(1, Token(text="a"))])
        client.script_flush()
        await events.write([entry(1, Token(text="a")), entry(2, Token(text="b")),
                            entry(3, Done(status="completed", partial=False))])

    trio.run(scenario)
    stream = [(f["event"], f["seq"]) for _, f in client.xrange(keys.stream)]
    assert stream == [("started", "0"), ("token", "1"), ("token", "2"), ("done", "3")]
    events.close()
    client.close()


def test_one_function_names_every_key_of_a_job_and_cluster_mode_tags_them():
    from config import ConfigError, job_keys, load_config

    plain = job_keys("sse:chat:{job_id}", "j-1", cluster=False)
    assert (plain.stream, plain.attempt, plain.done, plain.seq(2)) == (
        "sse:chat:j-1", "chat-actors:attempt:j-1", "chat-actors:done:j-1", "chat-actors:seq:j-1:2")
    tagged = job_keys("sse:chat:{job_id}", "j-1", cluster=True)
    keys = [tagged.stream, tagged.attempt, tagged.done, tagged.seq(2)]
    assert tagged.stream == "sse:chat:{j-1}"
    # Redis Cluster hashes only what is inside the first {...}: the same slot for all.
    assert {key[key.index("{") + 1:key.index("}")] for key in keys} == {"j-1"}
    config = load_config(environ={"CHAT_ACTORS__REDIS__CLUSTER": "true"})
    assert config.job_keys("j-2").stream == "sse:chat:{j-2}"
    with pytest.raises(ConfigError, match="must hold {job_id}"):
        load_config(environ={"CHAT_ACTORS__REDIS__CLUSTER": "true",
                             "CHAT_ACTORS__STREAM__KEY_TEMPLATE": "sse:chat:events"})


async def test_fence_reads_of_jobs_asking_at_once_share_one_round_trip():
    """Before every model call each job reads its fence: those asking while a read is
    in flight are read together in the next one, each gets its own answer, and a
    Redis failure is each asker's TransientError."""
    import threading

    from actors.adapters.redis.events import FenceReads

    reads: list[list[tuple[str, int]]] = []
    release = threading.Event()
    in_flight = trio.Event()

    def read(asked: list[tuple[str, int]]) -> list[bool]:
        reads.append(list(asked))
        trio.from_thread.run_sync(in_flight.set)
        release.wait(10)  # the first read stays in flight until all have asked
        return [attempt < 2 for _, attempt in asked]

    fences = FenceReads(read)
    found: dict[tuple[str, int], bool] = {}

    async def ask(key: tuple[str, int]) -> None:
        found[key] = await fences.ask(key)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, ("j0", 1))
        await in_flight.wait()
        for n in range(1, 50):
            nursery.start_soon(ask, (f"j{n}", 1 + n % 2))
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert len(reads) == 2 and len(reads[1]) == 49  # the 49 who waited: one read
    assert found == {(f"j{n}", 1 + n % 2): n % 2 == 0 for n in range(50)}

    import redis

    def broken(asked: list[tuple[str, int]]) -> list[bool]:
        raise redis.ConnectionError("Redis is away")

    failing = FenceReads(broken)
    with pytest.raises(TransientError, match="Redis is away"):
        await failing.ask(("j", 1))
