"""Backpressure (contract 6.7): a burst of 10 x max_in_flight stays bounded and completes."""

from __future__ import annotations

from collections import Counter

import confluent_kafka
import trio

from actors.adapters.kafka import RequestConsumer, ensure_topics
from actors.errors import TransientError
from tests.helpers import events_of, job_row, produce, request, until, worker_running
from tests.scripted_llm import Reply


async def test_a_burst_keeps_in_flight_bounded_and_completes_everything(make_config, llm, rds,
                                                                         db):
    config, _ = make_config(environ={"CHAT_ACTORS__JOBS__MAX_IN_FLIGHT": "3"})
    llm.default = Reply(tokens=("a", "b", "c"), token_delay_s=0.05)
    burst = [request(f"job {i}") for i in range(30)]
    async with worker_running(config) as worker:
        produce(config, *burst)
        for job in burst:
            events = await events_of(rds, config, job["jobId"])
            assert events[-1]["data"]["status"] == "completed"
        await until(lambda: worker.tracker.unsettled() == 0)
    assert len(llm.calls) == 30
    assert llm.max_active <= 3  # never more model calls at once than max_in_flight
    assert all(job_row(db, job["jobId"])["status"] == "completed" for job in burst)


async def test_partitions_paused_and_resumed_many_times_fetch_every_message_once(config):
    """The intake pauses at every max_in_flight crossing and resumes below low water,
    sometimes within one poll. A resume re-seeks each partition to the application's
    position (librdkafka 2.x otherwise restarts a resumed partition only at its broker
    thread's next wake-up, about a second later): after any run of toggles, every
    message is fetched, none twice and none skipped."""
    kafka = config.kafka
    await trio.to_thread.run_sync(lambda: ensure_topics(
        kafka.bootstrap_servers, kafka.producer, [kafka.request_topic], kafka.partitions))
    producer = confluent_kafka.Producer({"bootstrap.servers": kafka.bootstrap_servers})
    consumer = RequestConsumer(
        topic=kafka.request_topic, bootstrap=kafka.bootstrap_servers, group_id=kafka.group_id,
        session_timeout_ms=kafka.session_timeout_ms, fetch_wait_max_ms=kafka.fetch_wait_max_ms,
        extra=kafka.consumer, on_revoke=lambda _partitions: {})
    sent: list[bytes] = []
    seen: list[bytes] = []

    async def send(n: int) -> None:
        for _ in range(n):  # round the partitions: message i goes to i % partitions
            sent.append(str(len(sent)).encode())
            producer.produce(kafka.request_topic, value=sent[-1],
                             partition=int(sent[-1]) % kafka.partitions)
        await trio.to_thread.run_sync(producer.flush, 10.0)

    async def poll_once() -> None:
        seen.extend(d.value for d in await consumer.poll(10, 0.1))

    try:
        for rounds in range(4):
            for _ in range(rounds * 5):  # toggles faster than a fetch restarts
                await send(1)
                await consumer.resume()
                await poll_once()
                await consumer.pause()
                await poll_once()
            await consumer.resume()
            with trio.move_on_after(15):
                while len(set(seen)) < len(sent):
                    await poll_once()
            missing = len(sent) - len(set(seen))
            assert not missing, f"round {rounds}: {missing} message(s) never fetched again"
            # The intake commits only what settled: behind where the consumer stands.
            # (A resume must not restart from there: that would deliver twice.)
            behind = {(kafka.request_topic, p): 1 for p, n in Counter(
                int(v) % kafka.partitions for v in sent).items() if n >= 2}
            for _ in range(50):  # the broker may still be settling the group
                try:
                    await consumer.commit(behind)
                    break
                except TransientError:
                    await poll_once()
        assert len(seen) == len(set(seen)), "a resume delivered a message twice"
    finally:
        await consumer.close()
        producer.close()  # its threads would outlive the broker and log refusals
