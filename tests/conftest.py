"""Session fixtures: the real local stack (Kafka, Redis, Postgres) and the scripted vendor."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis

from actors.adapters.postgres import Postgres
from config import Config, load_config
from tests.helpers import JWT_SECRET
from tests.scripted_llm import ScriptedLLM
from tools import local_stack

pytest_plugins = ["tests.hang_watchdog"]


class Stack:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.kafka, self.redis, self.postgres = local_stack.start_core(workdir)

    def restart_postgres(self) -> None:
        """A real restart: same data, same port."""
        self.postgres.stop()
        self.postgres = local_stack.start_postgres(self.workdir, self.postgres.port)

    def stop(self) -> None:
        for service in (self.kafka, self.redis, self.postgres):
            service.stop()


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with local_stack.workdir("chat-actors-test-") as workdir:
        started = Stack(workdir)
        try:
            yield started
        finally:
            started.stop()


@pytest.fixture(scope="session")
def _llm_server() -> Iterator[ScriptedLLM]:
    server = ScriptedLLM().start()
    yield server
    server.stop()


@pytest.fixture
def llm(_llm_server: ScriptedLLM) -> ScriptedLLM:
    _llm_server.reset()
    return _llm_server


def config_text(stack: Stack, llm_url: str, tag: str, extra: str = "") -> str:
    return f"""
[kafka]
bootstrap_servers = "{stack.kafka.url}"
request_topic = "chat.request.{tag}"
control_topic = "chat.control.{tag}"
dlq_topic = "chat.request.dlq.{tag}"
group_id = "chat-actors-{tag}"
session_timeout_ms = 2000
fetch_wait_max_ms = 10
partitions = 3

[redis]
url = "{stack.redis.url}"

[postgres]
dsn = "{stack.postgres.url}"

[llm]
default_model = "scripted"
system_prompt = "You are a test."

[llm.models.scripted]
model = "openai/scripted-model"
api_base = "{llm_url}"
api_key_env = "SCRIPTED_LLM_KEY"
context_window = 4096
max_tokens = 256

[llm.models.priced]
model = "openai/gpt-4o-mini"
api_base = "{llm_url}"
api_key_env = "SCRIPTED_LLM_KEY"
context_window = 4096
max_tokens = 256

[shutdown]
grace_s = 5

[health]
port = 0

[rag]
path = "{stack.workdir}/rag"
{extra}
"""


@pytest.fixture
def make_config(stack: Stack, llm: ScriptedLLM,
                tmp_path: Path) -> Callable[..., tuple[Config, Path]]:
    """A config with topics and group of this test alone; `extra` is appended TOML."""

    def make(extra: str = "", tag: str | None = None,
             environ: dict[str, str] | None = None) -> tuple[Config, Path]:
        tag = tag or uuid.uuid4().hex[:10]
        path = tmp_path / f"config-{tag}.toml"
        path.write_text(config_text(stack, llm.url, tag, extra))
        return load_config(path, environ=environ or {}), path

    return make


@pytest.fixture
def gw_config(make_config: Callable[..., tuple[Config, Path]],
              monkeypatch: pytest.MonkeyPatch) -> Callable[..., Config]:
    """A config for a gateway of this test: any free port on loopback, the test secret."""
    monkeypatch.setenv("CHAT_ACTORS_JWT_SECRET", JWT_SECRET)

    def make(**environ: str) -> Config:
        return make_config(environ={"CHAT_ACTORS__GATEWAY__PORT": "0",
                                    "CHAT_ACTORS__GATEWAY__HOST": "127.0.0.1", **environ})[0]
    return make


@pytest.fixture
def config(make_config: Callable[..., tuple[Config, Path]]) -> Config:
    return make_config()[0]


@pytest.fixture
async def pg(stack: Stack) -> AsyncIterator[Postgres]:
    """The Postgres adapter on the test stack's database, migrated."""
    store = Postgres(dsn=stack.postgres.url, pool_size=2)
    await store.migrate()
    yield store
    store.close()


@pytest.fixture
def db(stack: Stack) -> Iterator[psycopg.Connection]:
    conn = psycopg.connect(stack.postgres.url, autocommit=True)
    yield conn
    conn.close()


@contextmanager
def own_database(url: str) -> Iterator[str]:
    """A new database on the Postgres at `url` for the block, then dropped; its name."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    try:
        yield name
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[arg-type]


@pytest.fixture
def fresh_dsn(stack: Stack) -> Iterator[str]:
    """A database of the test's own on the stack's Postgres (a RAG collection's keyword
    index lives in Postgres, beside the Chroma store the test made)."""
    with own_database(stack.postgres.url) as name:
        yield stack.postgres.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def rds(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    yield client
    client.close()
