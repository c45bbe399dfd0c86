"""supervisor: the only root nursery. Opens the trio-asyncio loop for the whole run,
checks every dependency, then starts the actors downstream first (sinks, then
intake) so a broken dependency fails start-up loudly instead of mid-job.

It is the composition root: the one actor module that imports adapters and
puts them behind the ports (actors/ports.py) the other actors are given.

Shutdown: the first SIGINT/SIGTERM stops intake, which drains running jobs
within shutdown.grace_s and commits what settled; the sinks then flush and
end. A second signal cancels everything at once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio

from actors import logs
from actors.adapters import aio, telemetry_of
from actors.adapters.kafka import ControlConsumer, Producer, RequestConsumer, ensure_topics
from actors.adapters.llm.openai_wire import (
    OpenAIWireChat,
    close_litellm_clients,
    load_litellm,
    needs_litellm,
)
from actors.adapters.llm.pricing import ModelPricing
from actors.adapters.llm.tokens import TiktokenCounting
from actors.adapters.postgres import Postgres, redact
from actors.adapters.rag.documents import DocumentStore
from actors.adapters.rag.embeddings import configured_embedder
from actors.adapters.redis.events import RedisEvents
from actors.claims import CLAIM_MAILBOX, Claims, PendingClaim, run_claims
from actors.control import ControlStats, run_control
from actors.errors import ChatActorsError, TransientError
from actors.health import Health, run_health
from actors.intake import run_intake
from actors.ledger import prune_ledger
from actors.metrics import Metrics
from actors.offsets import OffsetTracker
from actors.pg_sink import run_pg_sink
from actors.ports import ChatModel, Telemetry
from actors.redis_sink import run_redis_sink
from actors.registry import JobRegistry
from actors.retriever import Retriever, SearchOrder, run_retriever
from actors.watchdog import StepWatch
from actors.worker import FINISH_GRACE_S, Finishing, Worker
from config import Config, secret_problems
from messages.mailboxes import EventEmitted, PgSinkMessage

log = logging.getLogger("chat_actors.supervisor")

EVENT_MAILBOX = 1024
LAG_EVERY_S = 5.0
LITELLM_IDLE_S = 2.0
RECORD_MAILBOX = 256
# Search orders waiting for the retriever; a job past it waits to hand its order in.
SEARCH_MAILBOX = 128


class StartupError(ChatActorsError):
    """A dependency is missing or misconfigured; the message says which and where."""


@dataclass(frozen=True)
class WorkerHandle:
    """What a running worker exposes to its starter (tests, health)."""

    worker_id: str
    stop: trio.Event
    registry: JobRegistry
    tracker: OffsetTracker
    control: ControlStats
    consumer: RequestConsumer
    health: Health
    health_port: int


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def _watch_signals(stop: trio.Event, root: trio.CancelScope,
                         finishing: Finishing) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not stop.is_set():
                log.info("%s: draining (send again to stop at once)",
                         signal.Signals(signum).name)
                stop.set()
            else:
                log.warning("second signal: stopping now")
                finishing.bound(FINISH_GRACE_S)
                root.cancel()


async def _measure_lag(consumer: RequestConsumer, metrics: Metrics) -> None:
    """Consumer lag per partition, every few seconds, for /metrics."""
    while True:
        try:
            lags = await consumer.lag()
        except TransientError:
            lags = None  # the broker is away; /readyz says so
        if lags is not None:
            metrics.lag.clear()
            for (topic, partition), lag in lags.items():
                metrics.lag.labels(topic=topic, partition=str(partition)).set(lag)
        await trio.sleep(LAG_EVERY_S)


async def _check(what: str, where: str, probe: Callable[[], Awaitable[object]]) -> None:
    try:
        await probe()
    except TransientError as exc:
        said = str(exc)
        raise StartupError(said if said.startswith(f"{what} at {where} ")
                           else f"{what} at {where} is unreachable: {said}") from exc


@dataclass
class _Adapters:
    """The adapters behind one worker's ports, each checked reachable at start."""

    pg: Postgres
    events: RedisEvents
    control: ControlConsumer
    consumer: RequestConsumer
    dlq: Producer
    vendors: OpenAIWireChat
    documents: DocumentStore

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await self.dlq.close()
            await self.vendors.aclose()
        self.events.close()
        self.pg.close()
        self.documents.close()


async def _connect(config: Config, this_worker: str, tracker: OffsetTracker) -> _Adapters:
    """Build the adapters; a dependency that is missing fails start-up with StartupError
    (and what was opened before it is closed)."""
    async with contextlib.AsyncExitStack() as undo:
        pg = Postgres.of(config.postgres)
        undo.callback(pg.close)
        await _check("postgres", redact(config.postgres.dsn), pg.migrate)
        events = RedisEvents(config.redis, maxlen=config.stream.maxlen,
                             ttl_s=config.stream.ttl_s, keys=config.job_keys)
        undo.callback(events.close)
        await _check("redis", redact(config.redis.url), events.ping)
        kafka = config.kafka
        topics = (kafka.request_topic, kafka.control_topic, kafka.dlq_topic)

        async def topics_ready() -> None:
            created = await trio.to_thread.run_sync(
                ensure_topics, kafka.bootstrap_servers, kafka.client("producer"), topics,
                kafka.partitions)
            if created:
                log.info("created topics %s with %d partitions", created, kafka.partitions)

        await _check("kafka", kafka.bootstrap_servers, topics_ready)
        control = ControlConsumer(
            topic=kafka.control_topic, bootstrap=kafka.bootstrap_servers,
            group_id=f"{kafka.group_id}.control.{this_worker}",
            session_timeout_ms=kafka.session_timeout_ms,
            fetch_wait_max_ms=kafka.fetch_wait_max_ms, extra=kafka.client("consumer"))
        undo.push_async_callback(control.close)
        await _check("kafka", kafka.bootstrap_servers,
                     lambda: control.assign_since(config.control.tombstone_ttl_s))
        consumer = RequestConsumer(
            topic=kafka.request_topic, bootstrap=kafka.bootstrap_servers,
            group_id=kafka.group_id, session_timeout_ms=kafka.session_timeout_ms,
            fetch_wait_max_ms=kafka.fetch_wait_max_ms, extra=kafka.client("consumer"),
            on_revoke=tracker.revoke)
        adapters = _Adapters(
            pg=pg, events=events, control=control, consumer=consumer,
            dlq=Producer(bootstrap=kafka.bootstrap_servers, extra=kafka.client("producer")),
            vendors=OpenAIWireChat(),
            documents=await trio.to_thread.run_sync(DocumentStore.from_config, config, pg))
        undo.pop_all()  # started: from here the worker closes them
    return adapters


async def run_worker(config: Config, *, stop: trio.Event | None = None,
                     handle_signals: bool = True, chat: ChatModel | None = None,
                     telemetry: Telemetry | None = None,
                     task_status: trio.TaskStatus[WorkerHandle] = trio.TASK_STATUS_IGNORED,
                     ) -> None:
    """Run the worker until `stop` is set (or a signal arrives) and it has drained.
    `telemetry`: instead of what otel.* says (tests pass in-memory exporters)."""
    problems = secret_problems(config)
    if problems:
        raise StartupError("; ".join(problems))
    stop = trio.Event() if stop is None else stop
    this_worker = worker_id()
    tracker = OffsetTracker()
    metrics = Metrics()
    watch = StepWatch(metrics)
    trio.lowlevel.add_instrument(watch)
    made: list[Telemetry] = [telemetry] if telemetry is not None else []
    try:
        await _run(config, this_worker, tracker, metrics, chat=chat, stop=stop,
                   made=made, handle_signals=handle_signals, task_status=task_status)
    finally:
        trio.lowlevel.remove_instrument(watch)
        # What is still buffered is sent (in a thread: an away collector takes its timeout).
        with trio.CancelScope(shield=True):
            for each in made:
                await trio.to_thread.run_sync(each.close)
    log.info("worker %s stopped", this_worker)


async def _make_telemetry(config: Config, made: list[Telemetry]) -> None:
    """The telemetry otel.* asks for, built in a thread (importing the OpenTelemetry SDK
    and its exporter took 0.3 s) while the dependencies connect."""
    made.append(await trio.to_thread.run_sync(telemetry_of, config, "chat-actors"))


async def _run(config: Config, this_worker: str, tracker: OffsetTracker, metrics: Metrics, *,
               chat: ChatModel | None, made: list[Telemetry], stop: trio.Event,
               handle_signals: bool,
               task_status: trio.TaskStatus[WorkerHandle]) -> None:
    async with aio.open_bridge(closing=[close_litellm_clients]):
        tokens = TiktokenCounting()
        specs = config.llm.models.values()
        # LiteLLM costs seconds of CPU to import. An alias LiteLLM must serve has it
        # loaded before the worker is ready; a worker whose models model_map answers
        # (served over the OpenAI wire, unknown to LiteLLM's map) loads it once idle,
        # for the error answers it classifies (or at the first one, if that comes first).
        litellm_first = needs_litellm((s.model, s.api_base, s.api_key_env, s.stream_path)
                                      for s in specs)
        async with trio.open_nursery() as starting:
            # The tokenizers load in a thread while the dependencies connect: first
            # used by a job, they would stall the event loop.
            models = [spec.model for spec in specs]
            starting.start_soon(trio.to_thread.run_sync, partial(tokens.warm, models))
            if litellm_first:
                starting.start_soon(trio.to_thread.run_sync, load_litellm)
            if not made:  # none given: what otel.* says, built meanwhile
                starting.start_soon(_make_telemetry, config, made)
            adapters = await _connect(config, this_worker, tracker)
        events_in, events_out = trio.open_memory_channel[EventEmitted](EVENT_MAILBOX)
        records_in, records_out = trio.open_memory_channel[PgSinkMessage](RECORD_MAILBOX)
        searches_in, searches_out = trio.open_memory_channel[SearchOrder](SEARCH_MAILBOX)
        claims_in, claims_out = trio.open_memory_channel[PendingClaim](CLAIM_MAILBOX)
        worker = Worker(
            config=config, worker_id=this_worker, store=adapters.pg,
            chat=chat or adapters.vendors, pricing=ModelPricing(), tokens=tokens,
            events=events_in, records=records_in, event_log=adapters.events,
            # A tombstone outlives the longest wait behind a session (contract 2.2).
            registry=JobRegistry(tombstone_ttl_s=config.control.tombstone_ttl_s
                                 + config.jobs.session_wait_s,
                                 on_evict=metrics.tombstones_evicted.inc),
            scrub=logs.scrubber(logs.secrets_from(config)), metrics=metrics,
            retriever=Retriever(config, searches_in), telemetry=made[0],
            claims=Claims(claims_in))
        try:
            await _run_actors(worker, adapters, tracker, events_out, records_out, searches_out,
                              claims_out, stop=stop, litellm_loaded=litellm_first,
                              handle_signals=handle_signals, task_status=task_status)
        finally:
            await adapters.close()


async def _run_actors(worker: Worker, adapters: _Adapters, tracker: OffsetTracker,
                      events_out: trio.MemoryReceiveChannel[EventEmitted],
                      records_out: trio.MemoryReceiveChannel[PgSinkMessage],
                      searches_out: trio.MemoryReceiveChannel[SearchOrder],
                      claims_out: trio.MemoryReceiveChannel[PendingClaim], *,
                      stop: trio.Event, litellm_loaded: bool, handle_signals: bool,
                      task_status: trio.TaskStatus[WorkerHandle]) -> None:
    config, health, registry = worker.config, worker.health, worker.registry
    lease_holder = worker.worker_id
    control_stats = ControlStats()
    async with trio.open_nursery() as root, trio.open_nursery() as background:
        # `background` holds the actors that serve only while jobs run (health,
        # control, leases, lag, signals); they stop together once intake is done,
        # while the sinks in `root` flush what is left.
        health_port = await background.start(partial(
            run_health, health, port=config.health.port, metrics=worker.metrics))
        await root.start(partial(run_pg_sink, records_out, adapters.pg, lease_holder=lease_holder,
                                 batch_max=config.postgres.batch, health=health))
        superseded = "superseded: a later attempt holds the job"

        def stop_superseded(job_id: str, attempt: int) -> None:
            registry.stop(job_id, superseded, attempt=attempt)

        await root.start(partial(run_redis_sink, events_out, adapters.events,
                                 batch_max=config.stream.batch, health=health,
                                 on_superseded=stop_superseded))
        # Cancels stay honoured while running jobs drain; control stops after intake.
        await background.start(partial(run_control, adapters.control, registry,
                                       stats=control_stats, health=health))
        await background.start(partial(
            worker.leases.run, adapters.pg, lease_holder=lease_holder,
            lease_s=config.jobs.lease_s, health=health,
            on_lost=partial(registry.stop, reason=superseded)))
        # Running while intake drains (a job behind its session may still start).
        await background.start(partial(
            run_claims, claims_out, adapters.pg, lease_holder=lease_holder,
            lease_s=config.jobs.lease_s, history_limit=config.llm.max_history_turns,
            batch_max=config.kafka.poll_batch))
        _watch(worker.metrics, worker)
        await background.start(partial(run_retriever, searches_out, adapters.documents,
                                       embedder=partial(configured_embedder, config.rag)))
        background.start_soon(_measure_lag, adapters.consumer, worker.metrics)
        background.start_soon(prune_ledger, worker)
        if handle_signals:  # the process is ours
            background.start_soon(_watch_signals, stop, root.cancel_scope, worker.finishing)
            # What start-up loaded (LiteLLM alone is ~400k objects) stays for the life of
            # the process: out of the collector's sight, a full collection takes
            # milliseconds instead of stalling the event loop for ~0.4 s.
            gc.freeze()
        if not litellm_loaded:
            background.start_soon(_load_litellm_when_idle, registry, handle_signals)
        async with trio.open_nursery() as front:
            await front.start(partial(run_intake, adapters.consumer, adapters.dlq, worker,
                                      tracker, stop=stop))
            log.info("worker %s ready: %s -> %s", lease_holder, config.kafka.request_topic,
                     config.stream.key_template)
            health.started = True
            task_status.started(WorkerHandle(
                worker_id=lease_holder, stop=stop, registry=registry, tracker=tracker,
                control=control_stats, consumer=adapters.consumer, health=health,
                health_port=health_port))
        # Intake is done and closed the sinks' mailboxes: they flush and end.
        background.cancel_scope.cancel()


async def _load_litellm_when_idle(registry: JobRegistry, freeze: bool) -> None:
    """Load LiteLLM once no job has run for LITELLM_IDLE_S: importing it holds the GIL
    for seconds, which a running job's stream would feel."""
    idle_since = trio.current_time()
    while trio.current_time() - idle_since < LITELLM_IDLE_S:
        await trio.sleep(LITELLM_IDLE_S / 4)
        if registry.running():
            idle_since = trio.current_time()
    await trio.to_thread.run_sync(load_litellm, abandon_on_cancel=True)
    if freeze:  # what LiteLLM loaded joins what start-up loaded (see gc.freeze above)
        gc.freeze()


def _watch(metrics: Metrics, worker: Worker) -> None:
    """Gauges read when /metrics is scraped."""
    metrics.in_flight.set_function(worker.registry.running)
    metrics.tombstones.set_function(worker.registry.tombstones)
    metrics.watch_mailbox("redis_sink", lambda: worker.events.statistics().current_buffer_used)
    metrics.watch_mailbox("pg_sink", lambda: worker.records.statistics().current_buffer_used)
