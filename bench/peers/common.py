"""What both peer workers share besides their design: creating the topics, the control
consumer's assignment, a Kafka poll, `/readyz`, and the command line. Light on imports
(no LangChain, no aiohttp): each peer's start-up and memory stay its own."""

from __future__ import annotations

import argparse
import asyncio
import logging

import confluent_kafka
import confluent_kafka.admin
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.cimpl import NewTopic

log = logging.getLogger("peers")

TOPIC_PARTITIONS = 6  # chat-actors' default, used only if the topics do not exist yet
POLL_TIMEOUT_S = 0.5  # also how long a SIGTERM may wait for a poll to return
POLL_BATCH = 500


def ensure_topics(bootstrap: str, topics: list[str]) -> None:
    admin = confluent_kafka.admin.AdminClient({"bootstrap.servers": bootstrap})
    existing = admin.list_topics(timeout=10).topics
    missing = [NewTopic(t, num_partitions=TOPIC_PARTITIONS)
               for t in topics if t not in existing]
    for topic, future in (admin.create_topics(missing) if missing else {}).items():
        try:
            future.result(10)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            log.info("topic %s was created meanwhile", topic)


def assign_at_end(consumer: confluent_kafka.Consumer, topic: str) -> None:
    """Every partition from its current end, resolved now so no cancel slips past readiness."""
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, consumer.get_watermark_offsets(
        TopicPartition(topic, p), timeout=10)[1]) for p in partitions])


def poll_records(consumer: confluent_kafka.Consumer) -> list[confluent_kafka.Message]:
    """One poll's records, errors logged and left out."""
    # consume(n, timeout) waits the whole timeout unless n records arrive: block on poll()
    # for the first record, then take whatever else is already fetched.
    first = consumer.poll(POLL_TIMEOUT_S)
    if first is None:
        return []
    records = []
    for record in [first, *consumer.consume(POLL_BATCH - 1, 0)]:
        if record.error() is not None:
            log.warning("kafka: %s", record.error())
        else:
            records.append(record)
    return records


async def serve_health(port: int, ready: asyncio.Event) -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if path == b"/readyz":
                status = "200 OK" if ready.is_set() else "503 Service Unavailable"
            else:
                status = "200 OK" if path == b"/healthz" else "404 Not Found"
            writer.write(f"HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                         .encode())
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # the prober hung up or sent garbage
        finally:
            writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", port)


def peer_arguments(prog: str, doc: str | None, group: str) -> argparse.ArgumentParser:
    """The command line both peers take (bench/perf.py starts them the same way)."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    parser.add_argument("--kafka", required=True, help="bootstrap servers, HOST:PORT")
    parser.add_argument("--redis", required=True, help="redis://HOST:PORT/DB")
    parser.add_argument("--postgres", required=True, help="a libpq DSN")
    parser.add_argument("--llm-url", required=True, help="OpenAI-compatible base URL (…/v1)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--health-port", type=int, required=True)
    parser.add_argument("--group", default=group)
    parser.add_argument("--request-topic", default="chat.request")
    parser.add_argument("--control-topic", default="chat.control")
    parser.add_argument("--max-in-flight", type=int, default=1000)
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=2048, help="when a request sets none")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per job")
    parser.add_argument("--log-level", default="warning")
    return parser
