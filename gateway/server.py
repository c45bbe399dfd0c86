"""bin/chat-actors gateway: the composition root of the HTTP side.

Builds the adapters (a Kafka producer, Redis reads and readers, a small Postgres
pool), starts the relay's reader tasks and the HTTP/1.1 server (gateway/http1.py), and on
SIGTERM / SIGINT (or `stop`) drains: /readyz turns 503, every open event stream
gets a last `retry:` and closes (its client resumes on another gateway with its
Last-Event-ID), then the server stops.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from actors.adapters import telemetry_of
from actors.adapters.kafka import Producer, ensure_topics
from actors.adapters.postgres import Postgres
from actors.adapters.rag.documents import DocumentStore
from actors.adapters.rag.uploads import PDF_READER, UserDocuments
from actors.adapters.redis.keyspace import (
    ClusterReader,
    KeyspaceWatch,
    cluster_primaries,
    node_primary,
)
from actors.adapters.redis.streams import StreamReads
from actors.errors import PermanentError, TransientError
from actors.health import Health
from actors.ports import Telemetry
from config import Config, ConfigError, secret
from gateway.app import Gateway
from gateway.auth import Authenticator, Verifier
from gateway.http1 import Limits, serve
from gateway.relay import AnyRelay, NotifiedRelay, Relay
from gateway.routes import build_app

log = logging.getLogger("chat_actors.gateway")

READY_EVERY_S = 5.0
DRAIN_S = 2.0  # streams get their last `retry:` within this


@dataclass(frozen=True)
class GatewayHandle:
    port: int
    gateway: Gateway


def verifier_of(config: Config) -> Verifier:
    """The token check the config pins; ConfigError when its key is missing."""
    gw = config.gateway
    if gw.jwt_algorithm == "RS256":
        if not gw.jwt_public_key_file:
            raise ConfigError("gateway.jwt_public_key_file: RS256 needs the PEM public key")
        if not gw.jwt_audience:
            # An RS256 key is an identity provider's, and it signs tokens for every
            # application it serves: without an audience, any of those would be taken.
            raise ConfigError("gateway.jwt_audience: RS256 needs the audience this gateway's "
                              "tokens are issued for (the identity provider signs tokens for "
                              "other applications with the same key)")
        try:
            key: str | bytes = Path(gw.jwt_public_key_file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"gateway.jwt_public_key_file: {exc.strerror or exc}") from None
    else:
        value = secret(gw.jwt_secret_env)
        if value is None or len(value) < 32:
            raise ConfigError(f"gateway.jwt_secret_env: ${gw.jwt_secret_env} must hold an HS256 "
                              "secret of at least 32 characters")
        key = value
    return Verifier(key=key, algorithm=gw.jwt_algorithm, audience=gw.jwt_audience or None,
                    issuer=gw.jwt_issuer or None, user_claim=gw.user_claim)


async def _watch_readiness(health: Health, reads: StreamReads, pg: Postgres) -> None:
    probes: dict[str, Callable[[], Awaitable[object]]] = {
        "redis": reads.ping, "postgres": lambda: pg.run(lambda conn: conn.execute("SELECT 1"))}
    while True:
        for name, probe in probes.items():
            try:
                await probe()
            except (TransientError, PermanentError) as exc:
                if not health.is_down(name):
                    log.warning("%s is unreachable: %s", name, exc)
                health.failed(name, exc)
            else:
                health.recovered(name)
        await trio.sleep(READY_EVERY_S)


async def _connect(config: Config) -> tuple[StreamReads, AnyRelay, KeyspaceWatch | None]:
    """The Redis reads, the relay and the keyspace watch that tells it which streams grew
    (None: blocking readers); the Kafka topics exist after it. The reads are closed
    again when any of it fails."""
    reads = StreamReads(config.redis)
    try:
        relay, watch = await _relay_of(config, reads)
        await trio.to_thread.run_sync(partial(
            ensure_topics, config.kafka.bootstrap_servers, config.kafka.client("producer"),
            [config.kafka.request_topic, config.kafka.control_topic], config.kafka.partitions))
    except BaseException:
        reads.close()
        raise
    return reads, relay, watch


async def _relay_of(config: Config, reads: StreamReads) -> tuple[AnyRelay, KeyspaceWatch | None]:
    """Notified reads where keyspace notifications can be had (always on a Cluster, where
    a blocking XREAD cannot span streams); blocking readers where `stream_reads` asks
    for them, or, on `auto`, where the server refuses CONFIG SET."""
    mode = config.gateway.stream_reads
    prefix = config.stream.key_template.split("{job_id}", 1)[0]
    if config.redis.cluster:
        lookup = partial(cluster_primaries, reads.client, reads.primary())
        reader = partial(ClusterReader, reads.client)
    else:
        if mode == "blocking":
            return Relay(reads.reader, config.gateway.readers), None
        lookup = partial(node_primary, reads.primary, reads.client)
        reader = reads.reader
    try:
        await trio.to_thread.run_sync(lookup)  # notifications on, or why not
    except TransientError as exc:
        # Redis is away: it cannot say. The watch asks again until it can (the gateway
        # is not ready meanwhile), and sweeps every stream while it cannot.
        log.warning("keyspace notifications not confirmed yet (%s)", exc)
    except PermanentError as exc:
        if config.redis.cluster or mode == "notified":
            name = "redis.cluster" if config.redis.cluster else "gateway.stream_reads"
            raise ConfigError(f"{name}: {exc}") from None
        log.warning("streams are read by blocking readers: %s", exc)
        return Relay(reads.reader, config.gateway.readers), None
    relay = NotifiedRelay(reader)
    return relay, KeyspaceWatch(lookup, prefix, touch=relay.touch, sweep=relay.sweep)


async def _produce(producer: Producer, timeout_s: float, topic: str, value: bytes,
                   key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
    await producer.send(topic, value, key=key, headers=headers, timeout_s=timeout_s)


async def run_gateway(config: Config, *, stop: trio.Event | None = None,
                      handle_signals: bool = True, telemetry: Telemetry | None = None,
                      pdf_reader: Sequence[str] = PDF_READER,
                      task_status: trio.TaskStatus[GatewayHandle] = trio.TASK_STATUS_IGNORED
                      ) -> None:
    """Serve until `stop` is set or a signal arrives, then drain and return. `pdf_reader`
    is the command of the child process that reads an uploaded PDF (tests hold it)."""
    verifier = verifier_of(config)
    stop = trio.Event() if stop is None else stop
    reads, relay, watch = await _connect(config)
    producer = Producer(bootstrap=config.kafka.bootstrap_servers, extra=config.kafka.client("producer"))
    pg = Postgres.of(config.postgres)
    produce = partial(_produce, producer, config.gateway.produce_timeout_s)
    documents = UserDocuments(DocumentStore.from_config(config, pg), config,
                              pdf_reader=pdf_reader)
    telemetry = telemetry or telemetry_of(config, "chat-actors-gateway")
    gateway = Gateway(config=config, auth=Authenticator(verifier, pg), reads=reads,
                      relay=relay, history=pg,
                      produce=produce, documents=documents, telemetry=telemetry)
    try:
        await pg.migrate()  # the history tables, when the gateway starts before any worker
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(_watch_signals, stop)
            if watch is not None:
                await nursery.start(watch.run)
            await nursery.start(relay.run)
            nursery.start_soon(_watch_readiness, gateway.health, reads, pg)

            async def shutdown_trigger() -> None:
                await stop.wait()
                log.info("gateway draining: %d open streams get a last retry:",
                         relay.open_streams())
                gateway.close()
                with trio.move_on_after(DRAIN_S):
                    await relay.drained()

            async def serving(task_status: trio.TaskStatus[list[str]]) -> None:
                await serve(build_app(gateway), host=config.gateway.host,
                            port=config.gateway.port, limits=Limits(graceful_s=DRAIN_S + 1),
                            shutdown=shutdown_trigger, task_status=task_status)
                nursery.cancel_scope.cancel()  # served and drained: the readers stop too

            binds: list[str] = await nursery.start(serving)
            if handle_signals:  # the process is ours
                # What start-up loaded stays for the life of the process: out of the
                # collector's sight, its collections walk only what requests made.
                gc.freeze()
            port = int(binds[0].rsplit(":", 1)[1])
            gateway.health.started = True
            log.info("gateway ready: http://127.0.0.1:%d/", port)
            task_status.started(GatewayHandle(port=port, gateway=gateway))
    finally:
        with trio.CancelScope(shield=True):
            await producer.close()
            await trio.to_thread.run_sync(telemetry.close)
        reads.close()
        documents.close()
        pg.close()
    log.info("gateway stopped")


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: draining the gateway", signal.Signals(signum).name)
            stop.set()
