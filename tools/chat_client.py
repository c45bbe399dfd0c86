"""A small blocking client of the contract (DESIGN 1): produce a request, follow its events.

Used by `send` and `dev`; knows only the wire format, like the gateway does.
`print_answer` shows a job's events as they stream, for a person at a terminal.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import confluent_kafka
import redis

from config import Config


class ChatClient:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._producer = confluent_kafka.Producer({
            "bootstrap.servers": config.kafka.bootstrap_servers, "log.connection.close": False,
            **config.kafka.producer})
        self._redis = redis.Redis.from_url(config.redis.url, decode_responses=True)

    def stream_key(self, job_id: str) -> str:
        return self._config.stream.key(job_id)

    def send(self, message: str, *, user_id: str, session_id: str, model: str | None = None,
             job_id: str | None = None, **extra: Any) -> tuple[str, str]:
        """Produce one request; return (job_id, the stream id to read after)."""
        job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
        key = self.stream_key(job_id)
        last: Any = self._redis.xrevrange(key, count=1)  # str ids: decode_responses
        start_after = last[0][0] if last else "0-0"
        request = {"jobId": job_id, "userId": user_id, "sessionId": session_id,
                   "message": message, **extra}
        if model:
            request["model"] = model
        self._producer.produce(self._config.kafka.request_topic, key=session_id.encode(),
                               value=json.dumps(request).encode())
        if self._producer.flush(30):
            raise RuntimeError(f"kafka at {self._config.kafka.bootstrap_servers}: not delivered")
        return job_id, start_after

    def cancel(self, job_id: str, *, user_id: str, reason: str = "") -> None:
        self._producer.produce(self._config.kafka.control_topic, key=job_id.encode(),
                               value=json.dumps({"type": "cancel", "jobId": job_id,
                                                 "userId": user_id, "reason": reason}).encode())
        self._producer.flush(30)

    def events(self, job_id: str, after: str = "0-0",
               timeout_s: float = 600.0) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (event, data) for the job until its `done`."""
        key = self.stream_key(job_id)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found: Any = self._redis.xread({key: after}, block=1000, count=256)
            for _, entries in found or []:
                for entry_id, fields in entries:
                    after = entry_id
                    if fields.get("jobId") != job_id:
                        continue  # a shared stream carries other jobs too
                    yield fields["event"], json.loads(fields["data"])
                    if fields["event"] == "done":
                        return
        raise TimeoutError(f"no `done` for job {job_id} within {timeout_s:.0f}s")

    def close(self) -> None:
        self._producer.flush(5)
        self._redis.close()


def print_answer(client: Any, job_id: str, after: str, out: Any = sys.stdout) -> str:
    """Print a job's tokens as they stream, then one status line; return the status."""
    started = time.monotonic()
    first: float | None = None
    status = "unknown"
    for event, data in client.events(job_id, after):
        if event == "retrieval" and data["step"] == "rerank":
            for hit in data["hits"]:
                out.write(f"[source {hit['source']} (score {hit['score']:.2f})]\n")
        if event == "started" and data.get("attempt", 1) > 1:
            out.write(f"\n[attempt {data['attempt']}: restarting the answer]\n")
        elif event == "token":
            first = first or time.monotonic()
            out.write(data["text"])
            out.flush()
        elif event == "error":
            out.write(f"\n[error {data['code']}: {data['message']}]")
        elif event == "final":
            usage = data["usage"]
            cost = data["costUsd"]
            out.write(f"\n[{data['model']}: {usage['promptTokens']}+{usage['completionTokens']}"
                      f" tokens, cost {'n/a' if cost is None else f'${cost:.6f}'}")
            if first is not None:
                out.write(f", first token {1000 * (first - started):.0f} ms")
            out.write("]")
        elif event == "done":
            status = data["status"]
            out.write(f"\n[done: {status}{', partial' if data['partial'] else ''} "
                      f"in {time.monotonic() - started:.1f}s]\n")
    out.flush()
    return status
