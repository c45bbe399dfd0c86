"""A small blocking client of the contract (docs/contract.md): produce a request, follow its events.

Used by `send` and `dev`; knows only the wire format, like the gateway does.
`print_answer` shows a job's events as they stream, for a person at a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import confluent_kafka
import redis

from actors.adapters.kafka import LIBRDKAFKA_LOG
from actors.adapters.postgres import redact
from actors.adapters.redis.connect import RedisConnect
from config import Config


class Unreachable(Exception):
    """A dependency the command needs did not answer in time; the message names it."""


class ChatClient:
    """Every call gives up after `timeout_s` with Unreachable, naming what did not answer."""

    def __init__(self, config: Config, *, timeout_s: float = 5.0) -> None:
        if not LIBRDKAFKA_LOG.handlers:
            # A terminal command: librdkafka's lines reach configured logging, if any,
            # and are never printed raw (the command says in one line what failed).
            LIBRDKAFKA_LOG.addHandler(logging.NullHandler())
        self._config = config
        self._timeout_s = timeout_s
        self._producer = confluent_kafka.Producer({
            "bootstrap.servers": config.kafka.bootstrap_servers, "log.connection.close": False,
            # librdkafka's own lines go through logging, never raw to the terminal.
            "logger": LIBRDKAFKA_LOG, "message.timeout.ms": int(timeout_s * 1000),
            **config.kafka.client("producer")})
        # Reads block for 1 s at a time (events), so a reply may take that much longer.
        self._redis_connect = RedisConnect(config.redis, decode_responses=True,
                                           socket_connect_timeout=timeout_s,
                                           socket_timeout=timeout_s + 1)
        self._redis = self._redis_connect.client

    def _redis_call(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except redis.RedisError as exc:
            raise Unreachable(f"redis at {redact(self._config.redis.url)}: {what} failed: "
                              f"{exc}") from None

    def _produce(self, topic: str, key: bytes, value: bytes) -> None:
        failures: list[str] = []

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                failures.append(error.str())

        self._producer.produce(topic, key=key, value=value, on_delivery=delivered)
        left = self._producer.flush(self._timeout_s + 1)
        if left or failures:
            self._producer.purge()  # nothing may be sent later, behind the user's back
            why = f"{failures[0]}; " if failures else ""
            raise Unreachable(f"kafka at {self._config.kafka.bootstrap_servers}: {why}not "
                              f"delivered within {self._timeout_s:g} s (is the broker up?)")

    def stream_key(self, job_id: str) -> str:
        return self._config.job_keys(job_id).stream

    def send(self, message: str, *, user_id: str, session_id: str, model: str | None = None,
             job_id: str | None = None, **extra: Any) -> tuple[str, str]:
        """Produce one request; return (job_id, the stream id to read after)."""
        job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
        key = self.stream_key(job_id)
        # str ids: decode_responses
        last: Any = self._redis_call("reading the stream", self._redis.xrevrange, key, count=1)
        start_after = last[0][0] if last else "0-0"
        request = {"jobId": job_id, "userId": user_id, "sessionId": session_id,
                   "message": message, **extra}
        if model:
            request["model"] = model
        self._produce(self._config.kafka.request_topic, session_id.encode(),
                      json.dumps(request).encode())
        return job_id, start_after

    def cancel(self, job_id: str, *, user_id: str, reason: str = "") -> None:
        self._produce(self._config.kafka.control_topic, job_id.encode(),
                      json.dumps({"type": "cancel", "jobId": job_id, "userId": user_id,
                                  "reason": reason}).encode())

    def events(self, job_id: str, after: str = "0-0",
               timeout_s: float = 600.0) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (event, data) for the job until its `done`; `data` also names the
        entry's `attempt`, as the gateway's does."""
        key = self.stream_key(job_id)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found: Any = self._redis_call("reading the stream", self._redis.xread,
                                          {key: after}, block=1000, count=256)
            for _, entries in found or []:
                for entry_id, fields in entries:
                    after = entry_id
                    if fields.get("jobId") != job_id:
                        continue  # a shared stream carries other jobs too
                    data = json.loads(fields["data"])
                    if isinstance(data, dict) and "attempt" in fields:
                        data.setdefault("attempt", int(fields["attempt"]))
                    yield fields["event"], data
                    if fields["event"] == "done":
                        return
        raise TimeoutError(f"no `done` for job {job_id} within {timeout_s:.0f}s")

    def close(self) -> None:
        self._producer.purge()  # anything still queued was reported undelivered already
        self._producer.flush(0)
        self._redis_connect.close()


class Assembled:
    """A job's answer as a client assembles it from its events (contract 3.3): each
    attempt's text, the newest attempt's shown; `started` of a later attempt keeps the
    `resumes.chars` characters it continues, or starts over."""

    def __init__(self) -> None:
        self.attempt = 0
        self.texts: dict[int, str] = {}
        self.final: str | None = None

    @property
    def text(self) -> str:
        return self.texts.get(self.attempt, "")

    def add(self, event: str, attempt: int, data: dict[str, Any]) -> int | None:
        """Apply one event. For a later attempt's `started`, return how many characters
        of the text shown before stay (all of them: nothing to redraw); else None."""
        if event == "started" and attempt > self.attempt:
            shown = self.text
            resumes = data.get("resumes")
            base = ""
            if isinstance(resumes, dict):
                kept, chars = resumes.get("attempt"), resumes.get("chars")
                if isinstance(kept, int) and isinstance(chars, int):
                    base = self.texts.get(kept, "")[:max(chars, 0)]
            self.attempt = attempt
            self.texts[attempt] = base
            return len(base) if shown.startswith(base) else 0
        if attempt != self.attempt:
            return None  # an earlier attempt's (never after a later `started`)
        text = data.get("text")
        if event == "token" and isinstance(text, str):
            self.texts[attempt] = self.text + text
        elif event == "final" and isinstance(text, str):
            self.final = text
        return None


DIM, NORMAL = "\x1b[2m", "\x1b[0m"


def print_answer(client: Any, job_id: str, after: str, out: Any = sys.stdout) -> str:
    """Print a job's tokens as they stream, then one status line; return the status.
    Reasoning streams dimmed on a terminal, else between `[reasoning: ` and `]`."""
    started = time.monotonic()
    first: float | None = None
    status = "unknown"
    tty = bool(getattr(out, "isatty", lambda: False)())
    thinking = False
    answer = Assembled()
    for event, data in client.events(job_id, after):
        if event == "reasoning":
            if not thinking:
                out.write(DIM if tty else "[reasoning: ")
                thinking = True
            out.write(data["text"])
            out.flush()
            continue
        if thinking:
            out.write(f"{NORMAL}\n" if tty else "]\n")
            thinking = False
        if event == "retrieval" and data["step"] == "rerank":
            for hit in data["hits"]:
                out.write(f"[source {hit['source']} (score {hit['score']:.2f})]\n")
            if not data["hits"]:  # the search ran and found nothing: never a silent answer
                out.write("[no sources found: the answer draws on none of your documents]\n")
        shown = answer.text
        kept = answer.add(event, data.get("attempt", answer.attempt), data)
        if event == "started" and kept is not None and answer.attempt > 1:
            restarts = data.get("restarts") or {}
            if data.get("resumes") is None:
                why = f" ({restarts['reason']})" if "reason" in restarts else ""
                out.write(f"\n[attempt {answer.attempt}: restarting the answer{why}]\n")
            elif kept < len(shown):  # the text on screen runs past what is continued
                out.write(f"\n[attempt {answer.attempt}: continuing after {kept} characters]"
                          f"\n{answer.text}")
            # else: it continues exactly where the screen stops; nothing to show
        elif event == "token":
            first = first or time.monotonic()
            out.write(data["text"])
            out.flush()
        elif event == "tool_call":
            out.write(f"\n[tool call {data['id']}: {data['name']}({data['arguments']})]")
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
