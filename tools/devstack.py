"""`bin/chat-actors dev`: the whole product on loopback, then a chat prompt.

Starts Kafka, Redis, Postgres and SmolLM2 (tools/local_stack.py),
writes a config file for them, starts `chat-actors run --config` as a
subprocess (the same path as production), and sends each typed line as a
request of one session, printing the answer as it streams from Redis.

Everything lives under .dev/: a folder per run (logs, Kafka, Redis), one Postgres
kept across runs (.dev/postgres: sessions, jobs, the keyword index `ingest`
writes), and while a `dev` runs, its config (.dev/stack.toml), which the other
commands use when given no --config.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from tools import local_stack

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".dev"


def _serving(data: Path) -> int | None:
    """The port of a Postgres serving `data` now (another `dev` or `ingest` started it)."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
    except PermissionError:  # alive, run as the postgres account (we are root)
        port = int(lines[3])
    except (OSError, ValueError, IndexError):  # none, stale, or being written
        return None
    return port if local_stack.port_open(port) else None


@contextlib.contextmanager
def dev_postgres(home: Path = HOME) -> Iterator[str]:
    """The dev stack's Postgres, kept in home/postgres across runs: the one serving it
    now, or one started here until the block ends."""
    folder = home / "postgres"
    folder.mkdir(parents=True, exist_ok=True)
    port = _serving(folder / "pgdata")
    if port is not None:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        return
    try:
        service = local_stack.start_postgres(folder)
    except local_stack.StackError:
        port = _serving(folder / "pgdata")
        if port is None:
            raise
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"  # started meanwhile elsewhere
        return
    try:
        yield service.url
    finally:
        service.stop()


def running_config(home: Path = HOME) -> Path | None:
    """The config of the `dev` running now, if one is."""
    path = home / "stack.toml"
    try:
        pid = int(path.read_text().split("\n", 1)[0].removeprefix("# pid "))
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return path


def dev_config(*, kafka: str, redis: str, postgres: str, llm: str, rag_path: Path,
               gateway_port: int = 8080) -> str:
    return f"""\
# Written by `chat-actors dev` for its local stack.
[kafka]
bootstrap_servers = "{kafka}"
session_timeout_ms = 2000   # Tansu joins a group in about session.timeout.ms / 2
fetch_wait_max_ms = 20

[redis]
url = "{redis}"

[postgres]
dsn = "{postgres}"

[llm]
default_model = "local"

[llm.models.local]
model = "openai/smollm2"
api_base = "{llm}"
context_window = 2048
max_tokens = 200
input_cost_per_token = 0.0
output_cost_per_token = 0.0
# llama-cpp-python's server opens a new assistant turn after the last message: a job
# another worker takes over starts its answer over instead of continuing it.
continues = false

[shutdown]
grace_s = 5

[health]
port = 0                    # any free port: several dev stacks may run at once

[rag]
path = "{rag_path}"         # where `bin/chat-actors ingest` puts documents by default

[gateway]
host = "127.0.0.1"
port = {gateway_port}
dev_signin = true           # the page's "Sign in (dev)": never in production
"""


def _wait_ready(worker: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 120, *,
                what: str = "worker", mark: str = " ready: ") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if mark in text:
            return
        if worker.poll() is not None:
            raise local_stack.StackError(
                f"the {what} exited with {worker.returncode}: "
                f"{local_stack.last_words(log_path, lines=1)} (log: {log_path})")
        time.sleep(0.1)
    raise local_stack.StackError(f"the {what} did not become ready in {timeout_s:.0f} s: "
                                 f"{local_stack.last_words(log_path)} (log: {log_path})")


def _start(argv: list[str], log_path: Path, env: dict[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "tools.cli", *argv], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def run_dev(*, once: str | None, keep: bool, rag: bool = False, home: Path = HOME) -> int:
    from config import load_config
    from tools.chat_client import ChatClient, print_answer

    home.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="stack-", dir=home))
    stack_file = home / "stack.toml"
    services: list[local_stack.Service] = []
    # The model loads while the rest starts, and while the worker starts: only the
    # first answer needs it. Postgres starts beside Kafka and Redis.
    loading = ThreadPoolExecutor(max_workers=2)
    llm_port = local_stack.free_port()
    llm_started = loading.submit(local_stack.start_llama, workdir, llm_port)
    held = contextlib.ExitStack()
    worker: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    failed = False
    # Ctrl-C is ours to handle: stop everything in order, then exit.
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        say = (lambda *a: None) if once else (lambda *a: print(*a, file=sys.stderr))
        say("starting the local stack ...")
        postgres = loading.submit(held.enter_context, dev_postgres(home))
        try:
            services = local_stack.start_all(workdir, local_stack.start_kafka,
                                             local_stack.start_redis)
        finally:
            postgres_url = postgres.result()  # (started or failed: either way, it is held)
        kafka, redis = services
        config_path = workdir / "config.toml"
        gateway_port = local_stack.free_port()
        config_path.write_text(dev_config(kafka=kafka.url, redis=redis.url,
                                          postgres=postgres_url,
                                          llm=f"http://127.0.0.1:{llm_port}/v1",
                                          rag_path=(ROOT / ".data" / "rag").resolve(),
                                          gateway_port=gateway_port))
        log_path = workdir / "worker.log"
        worker = _start(["run", "--config", str(config_path)], log_path)
        if once is None:
            # The chat page: its sign-in tokens are signed with a secret of this run.
            env = {**os.environ, "CHAT_ACTORS_JWT_SECRET": secrets.token_urlsafe(48)}
            gateway_log = workdir / "gateway.log"
            gateway = _start(["gateway", "--config", str(config_path)], gateway_log, env)
            _wait_ready(gateway, gateway_log, what="gateway", mark="gateway ready:")
        _wait_ready(worker, log_path)
        llm = llm_started.result()
        services.append(llm)
        # `send`, `ingest`, `usage` ... without --config talk to this stack while it runs.
        stack_file.write_text(f"# pid {os.getpid()}\n{config_path.read_text()}")
        say(f"  kafka     {kafka.url}\n  redis     {redis.url}\n  postgres  {postgres_url}\n"
            f"  llm       {llm.url} (SmolLM2-135M)\n  worker    pid {worker.pid}, log {log_path}\n"
            f"  config    {config_path} (other commands use it while this runs)")
        client = ChatClient(load_config(config_path))
        session = f"dev-{uuid.uuid4().hex[:8]}"
        mode = {"mode": "rag"} if rag else {}
        try:
            if once is not None:
                job_id, after = client.send(once, user_id="dev", session_id=session, **mode)
                return 0 if print_answer(client, job_id, after) == "completed" else 1
            say("type a message and press Enter (Ctrl-D or Ctrl-C to quit)")
            while True:
                try:
                    line = input("you> ").strip()
                except EOFError:
                    print(file=sys.stderr)
                    return 0
                if line:
                    job_id, after = client.send(line, user_id="dev", session_id=session, **mode)
                    print_answer(client, job_id, after)
        finally:
            client.close()
    except KeyboardInterrupt:
        print("\nstopping ...", file=sys.stderr)
        return 130
    except local_stack.StackError as exc:  # one line: which service, where, why
        print(f"chat-actors dev: {exc}", file=sys.stderr)
        failed = True  # the folder stays: that line names the log in it
        return 1
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            _stop(gateway)
            _stop(worker)
            loading.shutdown()  # (a model still loading: its start ends first)
            if llm_started.exception() is None and llm_started.result() not in services:
                services.append(llm_started.result())
            for service in reversed(services):
                service.stop()
            held.close()  # the dev Postgres, if this run started it
            if running_config(home) == stack_file and stack_file.read_text().startswith(
                    f"# pid {os.getpid()}\n"):  # ours, not a later dev's
                stack_file.unlink()
            if keep:
                print(f"stack folder kept: {workdir}", file=sys.stderr)
            elif not failed:
                shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, sigterm)
