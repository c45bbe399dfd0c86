"""Logs: one JSON object per line, with the job's ids on every line about a job.

Code logs through the standard `logging` module; structlog's ProcessorFormatter
turns each record into JSON (or aligned text for reading by eye). The job's
`trace_id`, `job_id`, `user_id` and `session_id` are bound in the job's Trio
task with contextvars (`job_context`), so every line a job's tasks write
carries them without passing them around. Every secret the config names
(API keys, passwords, the DSN's password) is replaced by `[redacted]` in the
rendered line, whatever logged it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Generator, Iterable
from contextlib import contextmanager
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

from config import Config, secret, secret_variables

NOISY = ("LiteLLM", "litellm", "httpx", "httpcore", "openai", "chromadb", "kafka")
REDACTED = "[redacted]"


def secrets_from(config: Config) -> list[str]:
    """Every secret value the config points at, from the environment."""
    names = {*secret_variables(config).values(), "PGPASSWORD"}
    values = [secret(name) or "" for name in names]
    values += re.findall(r"://[^:/@]*:([^@]+)@", config.postgres.dsn + " " + config.redis.url)
    values += re.findall(r"password=(\S+)", config.postgres.dsn)
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def scrubber(secrets: Iterable[str]) -> Callable[[str], str]:
    """A function that replaces every secret in a text by `[redacted]`."""
    secrets = list(secrets)
    if not secrets:
        return str
    pattern = re.compile("|".join(re.escape(s) for s in secrets))
    return lambda text: pattern.sub(REDACTED, text)


class _Redact:
    def __init__(self, secrets: Iterable[str]) -> None:
        self._scrub = scrubber(secrets)

    def __call__(self, _logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
        return {k: self._scrub(v) if isinstance(v, str) else v for k, v in event.items()}


def configure(*, level: str, fmt: str = "json", secrets: Iterable[str] = (),
              stream: Any = None) -> None:
    """Route every `logging` record through structlog to `stream` (stderr)."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, _Redact(list(secrets)), renderer])
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


@contextmanager
def job_context(**ids: str) -> Generator[None]:
    """Bind the job's ids to every line logged in this task (and tasks it starts)."""
    with structlog.contextvars.bound_contextvars(**ids):
        yield
