"""confluent-kafka behind our ports. Its calls block, so each runs in a worker thread.

One consumer is never used from two threads at once: every call goes through a
CapacityLimiter of 1. Rebalance callbacks run inside `consume`, in that thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import confluent_kafka
import confluent_kafka.admin
import trio
from confluent_kafka import OFFSET_END, KafkaError, KafkaException, TopicPartition
from confluent_kafka.cimpl import NewTopic

from actors.errors import PermanentError, TransientError
from messages.mailboxes import Delivery, Partition


def _translate(exc: KafkaException) -> TransientError | PermanentError:
    error = exc.args[0] if exc.args else None
    if isinstance(error, KafkaError) and (error.retriable() or not error.fatal()):
        return TransientError(f"kafka: {error.str()}")
    return PermanentError(f"kafka: {exc}", code="kafka")


# librdkafka's own messages go through `logging` (so through our JSON lines), not
# straight to stderr; the client hands them over during poll.
LIBRDKAFKA_LOG = logging.getLogger("chat_actors.librdkafka")
log = logging.getLogger("chat_actors.kafka")


def _consumer_settings(bootstrap: str, group_id: str, session_timeout_ms: int,
                       fetch_wait_max_ms: int, extra: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "logger": LIBRDKAFKA_LOG,
        "group.id": group_id,
        # Offsets are ours to commit, only once a job is persisted (contract 6.1).
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": max(100, session_timeout_ms // 5),
        "fetch.wait.max.ms": fetch_wait_max_ms,
        **extra,
    }


def _delivery(message: confluent_kafka.Message) -> Delivery:
    """A consumed record as our own type (librdkafka sets topic, partition and offset
    on every record that is not an error; header values may arrive as str)."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    if topic is None or partition is None or offset is None:
        raise KafkaException(KafkaError(KafkaError._BAD_MSG, "a record without its position"))
    headers = tuple((name, value.encode() if isinstance(value, str) else value or b"")
                    for name, value in message.headers() or ())
    return Delivery(topic=topic, partition=partition, offset=offset, key=message.key(),
                    value=message.value(), headers=headers)


class _Consumer:
    """What both consumers share: one confluent Consumer used from one thread at a time."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._consumer = confluent_kafka.Consumer(settings)
        self._limiter = trio.CapacityLimiter(1)

    async def _run(self, fn: Callable[[], Any]) -> Any:
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except KafkaException as exc:
            raise _translate(exc) from exc

    async def poll(self, max_records: int, timeout_s: float) -> list[Delivery]:
        def consume() -> list[Delivery]:
            # consume(n, timeout) waits the whole timeout unless n messages come; a
            # cancel must not wait for a batch. Block for the first, then take what is there.
            first = self._consumer.poll(timeout_s)
            if first is None:
                return []
            rest = self._consumer.consume(num_messages=max_records - 1, timeout=0) \
                if max_records > 1 else []
            out: list[Delivery] = []
            for m in [first, *rest]:
                error = m.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(error)
                out.append(_delivery(m))
            return out

        return await self._run(consume)

    async def close(self) -> None:
        await self._run(self._consumer.close)


class ControlConsumer(_Consumer):
    """Reads every partition of the control topic with no group membership (assign)."""

    def __init__(self, *, topic: str, bootstrap: str, group_id: str, session_timeout_ms: int,
                 fetch_wait_max_ms: int, extra: Mapping[str, Any]) -> None:
        # group.id is required by the client, but assign() never joins the group.
        super().__init__(_consumer_settings(
            bootstrap, group_id, session_timeout_ms, fetch_wait_max_ms, extra))
        self.topic = topic

    async def assign_since(self, seconds_ago: float, timeout_s: float = 10.0) -> int:
        """Assign all partitions, from the first message of the last `seconds_ago`."""

        def assign() -> int:
            metadata = self._consumer.list_topics(self.topic, timeout=timeout_s)
            topic = metadata.topics.get(self.topic)
            if topic is None or topic.error is not None or not topic.partitions:
                raise TransientError(f"kafka: control topic {self.topic} not available")
            since_ms = int((time.time() - seconds_ago) * 1000)
            wanted = [TopicPartition(self.topic, p, since_ms) for p in topic.partitions]
            found = self._consumer.offsets_for_times(wanted, timeout=timeout_s)
            # No message that recent: -1, i.e. start at the end.
            self._consumer.assign([TopicPartition(self.topic, tp.partition,
                                                  tp.offset if tp.offset >= 0 else OFFSET_END)
                                   for tp in found])
            return len(found)

        return await self._run(assign)


class RequestConsumer(_Consumer):
    """The consumer-group side of the intake."""

    def __init__(self, *, topic: str, bootstrap: str, group_id: str, session_timeout_ms: int,
                 fetch_wait_max_ms: int, extra: Mapping[str, Any],
                 on_revoke: Callable[[list[Partition]], Mapping[Partition, int]]) -> None:
        super().__init__(_consumer_settings(
            bootstrap, group_id, session_timeout_ms, fetch_wait_max_ms, extra))
        self.topic = topic
        self._on_revoke = on_revoke
        self._paused = False
        self.revocations = 0  # partitions taken away: a rebalance we caused or suffered
        self._assigned: set[Partition] = set()
        self._assigned_lock = threading.Lock()
        # The next offset to read per partition, as the application stands: a seek
        # leaves librdkafka's position unknown until a message is consumed after it.
        self._next: dict[Partition, int] = {}
        self._consumer.subscribe([topic], on_assign=self._assigned_cb,
                                 on_revoke=self._revoked_cb, on_lost=self._revoked_cb)

    # -- rebalance callbacks: run in the consume thread --------------------------------
    def _assigned_cb(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        with self._assigned_lock:
            self._assigned.update((p.topic, p.partition) for p in partitions)
        if self._paused and partitions:
            consumer.pause(partitions)

    def _revoked_cb(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        revoked = [(p.topic, p.partition) for p in partitions]
        self.revocations += len(revoked)
        with self._assigned_lock:
            self._assigned.difference_update(revoked)
        for partition in revoked:
            self._next.pop(partition, None)
        # Commit what is settled before another member takes the partitions over.
        offsets = trio.from_thread.run_sync(self._on_revoke, revoked)
        if offsets:
            try:
                consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                asynchronous=False)
            except KafkaException:
                pass  # the partition's next holder redelivers; leases make that harmless

    # -- calls from Trio --------------------------------------------------------------
    async def poll(self, max_records: int, timeout_s: float) -> list[Delivery]:
        deliveries = await super().poll(max_records, timeout_s)
        for d in deliveries:
            self._next[(d.topic, d.partition)] = d.offset + 1
        return deliveries

    def assigned(self) -> set[Partition]:
        with self._assigned_lock:
            return set(self._assigned)

    async def commit(self, offsets: Mapping[Partition, int], *, wait: bool = True) -> None:
        """Commit `offsets` (each the next offset to read); with `wait`, until the broker
        answers. A worker that is leaving does not wait: a sync commit during a rebalance
        waits for this member to rejoin, which it never does while blocked (seen: a
        worker stopped right after another hung past 30 s). close() leaves the group."""
        if not offsets:
            return
        parts = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        await self._run(lambda: self._consumer.commit(offsets=parts, asynchronous=not wait))

    async def lag(self) -> dict[Partition, int]:
        """Messages not yet consumed per assigned partition (high watermark - position),
        from the client's cached watermarks; a partition nothing was fetched from yet (the
        intake paused first) is asked of the broker, else its waiting requests would be
        invisible to an autoscaler."""

        def measure() -> dict[Partition, int]:
            parts = [TopicPartition(t, p) for t, p in self.assigned()]
            if not parts:
                return {}
            lags = {}
            for tp in self._consumer.position(parts):
                low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    try:
                        asked = self._consumer.get_watermark_offsets(tp, timeout=2.0)
                    except KafkaException:
                        asked = None
                    if not asked:
                        continue  # unknown, not zero
                    low, high = asked
                # Where the application stands (after a seek librdkafka's position is
                # unknown, or still the old one); else its position, else the low
                # watermark (nothing consumed yet).
                start = self._next.get((tp.topic, tp.partition),
                                       tp.offset if tp.offset >= 0 else low)
                lags[(tp.topic, tp.partition)] = max(high - max(start, 0), 0)
            return lags

        return await self._run(measure)

    async def pause(self) -> None:
        self._paused = True
        await self._run(lambda: self._consumer.pause(
            [TopicPartition(t, p) for t, p in self.assigned()]))

    async def resume(self) -> None:
        """Resume every assigned partition, then seek each to where the application
        stands. librdkafka 2.x restarts a resumed partition only at its broker thread's
        next wake-up, up to a second later; at every max_in_flight crossing that capped
        a backlog's intake. A seek starts the fetch at once, and to the application's
        own position it neither skips nor repeats."""
        self._paused = False

        def resume() -> None:
            parts = [TopicPartition(t, p) for t, p in self.assigned()]
            if not parts:
                return
            self._consumer.resume(parts)
            known: list[TopicPartition] = []
            unread: list[TopicPartition] = []
            for tp in self._consumer.position(parts):
                offset = self._next.get((tp.topic, tp.partition), tp.offset)
                (known if offset >= 0 else unread).append(
                    TopicPartition(tp.topic, tp.partition, offset))
            if unread:  # nothing consumed from them yet: their committed offset
                try:
                    known += [tp for tp in self._consumer.committed(unread, timeout=5.0)
                              if tp.offset >= 0]
                except KafkaException as exc:
                    log.warning("kafka: no committed offsets to restart %d resumed "
                                "partition(s) from: %s", len(unread), exc)
            for tp in known:
                self._consumer.seek(tp)

        await self._run(resume)

    async def seek(self, deliveries: Iterable[Delivery]) -> None:
        """Rewind each partition to the first of `deliveries` so they are fetched again."""
        first: dict[Partition, int] = {}
        for d in deliveries:
            first.setdefault((d.topic, d.partition), d.offset)

        def rewind() -> None:
            for (t, p), o in first.items():
                self._consumer.seek(TopicPartition(t, p, o))
                self._next[(t, p)] = o

        await self._run(rewind)

class NotDelivered(TransientError):
    """The broker did not confirm a message in time: it may still land later (a frozen
    broker reads its socket when it thaws), so whoever needs "never" must fence it."""


class Producer:
    """Produces and waits for the broker's ack (the DLQ must be durable before a commit).

    Sends do not queue behind each other: each one hands its message to librdkafka at
    once (a non-blocking call) and waits for its own delivery report, which a poller
    thread serves as acks come in. A broker stall holds every send for its timeout at
    the same time, not one after another.
    """

    POLL_S = 0.05  # how long one poll waits for a delivery report before polling again

    def __init__(self, *, bootstrap: str, extra: Mapping[str, Any]) -> None:
        self._producer = confluent_kafka.Producer({
            "bootstrap.servers": bootstrap, "logger": LIBRDKAFKA_LOG, "enable.idempotence": True,
            "linger.ms": 5, **extra})
        self._closing = threading.Event()
        self._poller: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._closing.is_set():
            self._producer.poll(self.POLL_S)

    async def send(self, topic: str, value: bytes | None, *, key: bytes | None = None,
                   headers: Iterable[tuple[str, bytes]] = (), timeout_s: float = 30.0) -> None:
        """Return once the broker has the message; NotDelivered after `timeout_s` without
        its ack, TransientError when librdkafka reports it failed."""
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="kafka-producer-poll",
                                            daemon=True)
            self._poller.start()
        token = trio.lowlevel.current_trio_token()
        reported = trio.Event()
        errors: list[KafkaError] = []

        def delivered(err: KafkaError | None, _msg: Any) -> None:  # on the poller thread
            if err is not None:
                errors.append(err)
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(reported.set)

        try:
            self._producer.produce(topic, value=value, key=key, headers=list(headers),
                                   on_delivery=delivered)
        except BufferError as exc:
            raise TransientError("kafka: the producer's queue is full (the broker is not "
                                 "taking messages)") from exc
        except KafkaException as exc:
            raise _translate(exc) from exc
        with trio.move_on_after(timeout_s):
            await reported.wait()
        if not reported.is_set():
            raise NotDelivered(f"kafka: the broker did not confirm the message in {timeout_s:g}s")
        if errors:
            raise NotDelivered(f"kafka: delivery failed: {errors[0].str()}")

    async def close(self) -> None:
        """Deliver what is queued (up to 10 s), then stop the poller."""
        await trio.to_thread.run_sync(self._producer.flush, 10.0)
        self._closing.set()
        if self._poller is not None:
            await trio.to_thread.run_sync(self._poller.join)


def ensure_topics(bootstrap: str, extra: Mapping[str, Any], topics: Iterable[str],
                  partitions: int, timeout_s: float = 10.0) -> list[str]:
    """Check the broker answers, and create missing topics; return those created.

    Blocking: run in a thread. Creation needs the broker's permission; where the
    platform team owns topics it is refused and the worker says so and goes on.
    """
    said: list[str] = []  # librdkafka's last error: why a broker could not be reached

    def heard(error: KafkaError) -> None:
        if not error.str().endswith("brokers are down"):
            said[:] = [error.str()]

    settings: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": LIBRDKAFKA_LOG,
                                "error_cb": heard, **extra}
    admin = confluent_kafka.admin.AdminClient(settings)
    try:
        existing = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        admin.poll(0)  # serves the errors queued meanwhile (a TLS or SASL failure says why)
        why = f" ({said[0][:500]})" if said else ""
        raise TransientError(f"kafka at {bootstrap} is unreachable: {exc}{why}") from exc
    missing = [t for t in topics if t not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1)
         for t in missing], request_timeout=timeout_s)
    created = []
    for topic, future in futures.items():
        try:
            future.result(timeout_s)
            created.append(topic)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if not (isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise PermanentError(f"kafka: cannot create topic {topic}: {exc}",
                                     code="kafka") from exc
    return created
