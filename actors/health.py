"""health: /healthz (alive), /readyz (dependencies reachable, not draining) and
/metrics (Prometheus text) over HTTP, served from the worker's Trio process.

Readiness is fed by the actors: a transient failure of Redis, Postgres, Kafka or
the vendor marks that dependency down until its next success.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

import trio
from prometheus_client import CONTENT_TYPE_LATEST

from actors.metrics import Metrics

log = logging.getLogger("chat_actors.health")

MAX_REQUEST_BYTES = 8192


class Health:
    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()
        self._down: dict[str, str] = {}
        self.started = False
        self.draining = False

    def failed(self, dependency: str, problem: object) -> None:
        self.failures[dependency] += 1
        self._down[dependency] = str(problem)

    def is_down(self, dependency: str) -> bool:
        return dependency in self._down

    def recovered(self, dependency: str) -> None:
        self._down.pop(dependency, None)

    def ready(self) -> bool:
        return self.started and not self.draining and not self._down

    def report(self) -> dict[str, object]:
        return {"ready": self.ready(), "started": self.started, "draining": self.draining,
                "down": dict(self._down), "failures": dict(self.failures)}


def _response(status: str, body: dict[str, object] | bytes,
              content_type: str = "application/json") -> bytes:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n").encode() + payload


async def _serve_one(stream: trio.abc.Stream, health: Health,
                     metrics: Metrics | None) -> None:
    async with stream:
        request = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST_BYTES:
                chunk = await stream.receive_some(1024)
                if not chunk:
                    break
                request += chunk
        parts = request.split(b" ", 2)
        path = parts[1].decode(errors="replace") if len(parts) > 1 else ""
        if path == "/healthz":
            reply = _response("200 OK", {"alive": True})
        elif path == "/readyz":
            ok = health.ready()
            reply = _response("200 OK" if ok else "503 Service Unavailable", health.report())
        elif path == "/metrics" and metrics is not None:
            reply = _response("200 OK", metrics.render(), CONTENT_TYPE_LATEST)
        else:
            reply = _response("404 Not Found", {"error": f"no such path: {path}"})
        try:
            await stream.send_all(reply)
        except trio.BrokenResourceError:
            pass  # the prober hung up


async def run_health(health: Health, *, port: int, metrics: Metrics | None = None,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve on every address (containers probe from outside); port 0 picks a free one.

    A port already taken (two workers on one host) is logged loudly but does not
    stop the worker: serving chat matters more than answering probes.
    """
    try:
        listeners = await trio.open_tcp_listeners(port, host="0.0.0.0")
    except OSError as exc:
        log.error("health: cannot listen on port %d (%s); /healthz and /readyz are off", port,
                  exc.strerror or exc)
        task_status.started(0)
        await trio.sleep_forever()
    bound = listeners[0].socket.getsockname()[1]
    log.info("health on :%d (/healthz, /readyz, /metrics)", bound)
    task_status.started(bound)

    async def serve(stream: trio.SocketStream) -> None:
        await _serve_one(stream, health, metrics)

    await trio.serve_listeners(serve, listeners)
