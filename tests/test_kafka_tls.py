"""Kafka over TLS, the transport of managed Kafka's SASL_SSL, with librdkafka's own TLS.

The local broker (Tansu) serves plaintext only (its --cert leaves the listener
plaintext) and cannot do SASL, so a TLS terminator of the test's, with a private CA,
stands in front of a broker that advertises the terminator's address: every connection
the worker and the gateway open to the broker (bootstrap, partition leaders, the admin
client, the control consumer, the dead-letter producer) is TLS, with the certificate
and host name verified against `ssl.ca.location`. What the terminator cannot show is
SASL itself; where its password comes from and goes is tested in test_config."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from actors.supervisor import StartupError, run_worker
from tests.helpers import gateway_running, worker_running
from tests.scripted_llm import Reply
from tests.test_gateway import bearer, parse_sse, read_events
from tools import local_stack


class Terminator:
    """TLS on `port` (host name localhost), plaintext to the broker behind it."""

    def __init__(self, port: int, broker_port: int) -> None:
        self.port, self.broker_port = port, broker_port
        self.handshakes = 0  # connections that completed TLS
        self.refused = 0  # connections whose client gave up in the handshake

    async def serve(self, context: ssl.SSLContext, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.serve_ssl_over_tcp(self._forward, self.port, context, host="localhost",
                                      task_status=task_status)

    async def _forward(self, client: trio.SSLStream[Any]) -> None:
        try:
            await client.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.refused += 1
            return
        self.handshakes += 1
        try:
            broker = await trio.open_tcp_stream("127.0.0.1", self.broker_port)
        except OSError:
            await client.aclose()
            return
        async with client, broker, trio.open_nursery() as nursery:
            async def pump(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
                try:
                    while data := await source.receive_some(65536):
                        await sink.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()  # one side closed: the connection is over

            nursery.start_soon(pump, client, broker)
            nursery.start_soon(pump, broker, client)


@pytest.fixture
async def tls_broker(tmp_path: Path, nursery: trio.Nursery
                     ) -> AsyncIterator[tuple[Terminator, Path]]:
    ca = trustme.CA()
    ca_file = tmp_path / "kafka-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    front = local_stack.free_port()
    broker = local_stack.start_kafka(tmp_path, advertised=f"localhost:{front}")
    terminator = Terminator(front, broker.port)
    try:
        await nursery.start(terminator.serve, context)
        yield terminator, ca_file
    finally:
        broker.stop()


def tls_config(make_config: Any, terminator: Terminator, ca_file: Path | None) -> Any:
    settings = '"security.protocol" = "SSL"\n' + (
        f'"ssl.ca.location" = "{ca_file}"\n' if ca_file else "")
    return make_config(
        extra=f"[kafka.producer]\n{settings}[kafka.consumer]\n{settings}",
        environ={"CHAT_ACTORS__KAFKA__BOOTSTRAP_SERVERS": f"localhost:{terminator.port}",
                 "CHAT_ACTORS__GATEWAY__PORT": "0", "CHAT_ACTORS__GATEWAY__HOST": "127.0.0.1"})[0]


async def test_the_worker_and_the_gateway_reach_the_broker_over_verified_tls(
        make_config, llm, tls_broker, monkeypatch):
    from tests.helpers import JWT_SECRET

    monkeypatch.setenv("CHAT_ACTORS_JWT_SECRET", JWT_SECRET)
    terminator, ca_file = tls_broker
    config = tls_config(make_config, terminator, ca_file)
    llm.queue(Reply(tokens=("Over", " TLS", ".")),
              Reply(tokens=tuple(f"t{n} " for n in range(400)), token_delay_s=0.05))
    with trio.fail_after(120):
        async with worker_running(config), gateway_running(config) as (_, http):
            answered = await http.post("/v1/chat", headers=bearer(),
                                       json={"sessionId": "s-tls", "message": "Secure?"})
            assert answered.status_code == 202
            status, text = await read_events(http, answered.json()["jobId"])
            events = parse_sse(text)
            assert status == 200 and events[-2]["data"]["text"] == "Over TLS."
            # A cancel goes through the control topic: the control consumer is on TLS too.
            slow = await http.post("/v1/chat", headers=bearer(),
                                   json={"sessionId": "s-tls-2", "message": "slow"})
            job_id = slow.json()["jobId"]
            async with http.stream("GET", f"/v1/jobs/{job_id}/events",
                                   headers=bearer()) as response:
                seen = ""
                async for chunk in response.aiter_text():
                    seen += chunk
                    if "event: token" in seen and "cancel" not in seen:
                        cancel = await http.post(f"/v1/jobs/{job_id}/cancel", headers=bearer())
                        assert cancel.status_code == 202
                        seen += "\n: cancel sent\n"
            assert parse_sse(seen)[-1]["data"]["status"] == "cancelled"
    assert terminator.handshakes >= 3  # bootstrap, the partition leader, the control topic
    assert terminator.refused == 0


async def test_a_broker_certificate_the_worker_cannot_verify_fails_start_up_by_name(
        make_config, tls_broker):
    terminator, _ = tls_broker
    config = tls_config(make_config, terminator, None)  # our CA is not the system's
    cause = pytest.RaisesExc(StartupError, match=(
        r"^kafka at localhost:\d+ is unreachable: .*SSL handshake failed: .*certificate "
        r"verify failed.*ssl\.ca\.location"))
    with trio.fail_after(120), pytest.RaisesGroup(cause, flatten_subgroups=True):
        await run_worker(config, stop=trio.Event(), handle_signals=False)
    assert terminator.refused >= 1 and terminator.handshakes == 0
