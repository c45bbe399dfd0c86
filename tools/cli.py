"""The command line of bin/chat-actors: run, dev, send, cancel, migrate, usage, keys, ingest,
bench, test."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence

    from actors.adapters.postgres import Postgres
    from messages.ports import UsageRow

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def _config(path: str | None) -> Any:
    from config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        sys.exit(f"chat-actors: config error: {exc}")


@contextlib.contextmanager
def _config_or_dev(path: str | None, command: str, *, postgres: bool = False
                   ) -> Iterator[tuple[Any, bool]]:
    """(config, on the dev stack): --config FILE, or CHAT_ACTORS__* variables alone, as
    given; otherwise the config of the `bin/chat-actors dev` running now; otherwise, for
    a command that only needs Postgres (`postgres`), the default config on the dev
    stack's own Postgres (.dev/postgres), started for this command."""
    from tools import devstack

    if path is not None or any(name.startswith("CHAT_ACTORS__") for name in os.environ):
        yield _config(path), False
        return
    running = devstack.running_config()
    if running is not None:
        print(f"chat-actors {command}: no --config: using the running dev stack "
              f"({running.relative_to(ROOT) if running.is_relative_to(ROOT) else running})",
              file=sys.stderr)
        yield _config(str(running)), True
        return
    if not postgres:
        yield _config(None), False
        return
    from config import ConfigError, load_config
    from tools.local_stack import StackError

    try:
        with devstack.dev_postgres() as dsn:
            print(f"chat-actors {command}: no --config: using the dev stack's Postgres "
                  "(.dev/postgres, kept across runs, as `dev` does)", file=sys.stderr)
            try:
                config = load_config(None, {**os.environ, "CHAT_ACTORS__POSTGRES__DSN": dsn})
            except ConfigError as exc:
                sys.exit(f"chat-actors: config error: {exc}")
            yield config, True
    except StackError as exc:
        sys.exit(f"chat-actors {command}: {exc}")


def _logging(config: Any) -> None:
    from actors import logs

    logs.configure(level=config.log.level, fmt=config.log.format, secrets=logs.secrets_from(config))


def cmd_run(args: argparse.Namespace) -> int:
    from actors.supervisor import StartupError, run_worker

    config = _config(args.config)
    _logging(config)
    return _serve(run_worker, config, StartupError, "chat-actors")


def cmd_gateway(args: argparse.Namespace) -> int:
    from actors.errors import PermanentError, TransientError
    from config import ConfigError
    from gateway.server import run_gateway, verifier_of

    config = _config(args.config)
    _logging(config)
    try:
        verifier_of(config)
    except ConfigError as exc:
        print(f"chat-actors gateway: config error: {exc}", file=sys.stderr)
        return 2
    return _serve(run_gateway, config, (OSError, ConfigError, PermanentError, TransientError),
                  "chat-actors gateway")


def _serve(main: Callable[[Any], Awaitable[None]], config: Any,
           cannot_start: type[Exception] | tuple[type[Exception], ...], prog: str) -> int:
    """Run a server's Trio main; a start-up failure (however deep in its nurseries)
    is one line per cause and exit code 1."""
    import trio

    failed = False
    try:
        trio.run(main, config)
    except* cannot_start as group:
        for exc in leaves(group):
            print(f"{prog}: cannot start: {exc}", file=sys.stderr)
        failed = True
    return _exit_now(1 if failed else 0)


def _exit_now(code: int) -> NoReturn:
    """Exit once the server has stopped (drained, flushed, telemetry sent): flush the
    logs and leave without interpreter finalization, where third-party finalizers ran
    (LiteLLM's aiohttp transport's __del__ once hung a stopped worker for 30 s, until
    it was killed)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    """The exceptions inside nested exception groups (Trio nurseries nest them), so
    an operator reads the cause, not "Exceptions from Trio nursery (1 sub-exception)"."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


def since_arg(text: str) -> datetime:
    """`--since`: an ISO date or time (UTC unless it says), or an age like 30m, 24h, 7d."""
    ages = {"m": 60, "h": 3600, "d": 86400}
    if text[:-1].isdigit() and text[-1:] in ages:
        return datetime.now(UTC) - timedelta(seconds=int(text[:-1]) * ages[text[-1]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a date/time like 2026-11-01 or 2026-11-01T12:00 "
            "nor an age like 30m, 24h or 7d") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cmd_usage(args: argparse.Namespace) -> int:
    by_key = args.by == "key"
    rows = _with_postgres(args.config, "usage", lambda pg: pg.usage(
        user_id=args.user, since=args.since, by_key=by_key))
    if rows is None:
        return 1
    # Cached, cache-write and reasoning tokens are parts of the prompt / completion counts.
    head = ("user", *(("key",) if by_key else ()), "model", "jobs", "prompt tokens", "cached",
            "cache writes", "completion tokens", "reasoning", "cost USD")
    named = 3 if by_key else 2  # the columns that name the row: left-aligned

    def cells(names: tuple[str, ...], of: Sequence[UsageRow]) -> tuple[str, ...]:
        return (*names, f"{sum(r.jobs for r in of):,}",
                *(f"{sum(getattr(r, name) for r in of):,}" for name in (
                    "prompt_tokens", "cached_tokens", "cache_write_tokens", "completion_tokens",
                    "reasoning_tokens")),
                f"{sum(r.cost_usd for r in of):.6f}")

    # By key, a job no key authenticated (a JWT's) shows "-".
    table = [cells((r.user_id, *((r.api_key_id or "-",) if by_key else ()), r.model), [r])
             for r in rows]
    table.append(cells(("total", *("" for _ in range(named - 1))), rows))
    _print_table(head, table, named)
    return 0


def _print_table(head: Sequence[str], table: Sequence[Sequence[str]], named: int) -> None:
    """Columns padded to their widest cell: the first `named` left-aligned, the rest
    (figures) right-aligned."""
    widths = [max(len(row[i]) for row in (head, *table)) for i in range(len(head))]
    for row in (head, *table):
        print("  ".join(cell.ljust(w) if i < named else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())


def _with_postgres(path: str | None, command: str,
                   query: Callable[[Postgres], Awaitable[T]]) -> T | None:
    """`query` on the Postgres of the config (see _config_or_dev), or None once a
    Postgres that cannot be reached now is reported in one line."""
    import trio

    from actors.adapters.postgres import Postgres, redact
    from actors.errors import TransientError

    with _config_or_dev(path, command, postgres=True) as (config, dev):
        pg = Postgres.of(config.postgres, pool_size=1)

        async def read() -> T:
            if dev:  # (the dev stack's Postgres may not have met a worker yet)
                await pg.migrate()
            return await query(pg)

        try:
            return trio.run(read)
        except TransientError as exc:
            print(f"chat-actors: postgres at {redact(config.postgres.dsn)}: {exc}",
                  file=sys.stderr)
            return None
        finally:
            pg.close()


# -- API keys: `keys create | list | revoke` ----------------------------------------------

def user_arg(text: str) -> str:
    """`--user`: a userId of the contract, as a key's requests will carry it."""
    from messages.wire import is_ident

    # (is_ident's `$` also matches before a final line break: refused here on its own.)
    if not is_ident(text) or text.endswith("\n"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a userId: 1-128 characters of A-Z a-z 0-9 . _ : -")
    return text


def key_name_arg(text: str) -> str:
    """`--name`: a label for people, printed in `keys list`'s table."""
    if not text.strip() or len(text) > 100 or not text.isprintable():
        raise argparse.ArgumentTypeError(
            "a key's name is 1-100 printable characters (no line breaks or control characters)")
    return text


def key_id_arg(text: str) -> str:
    """`keys revoke ID`: a key's id as `keys create` and `keys list` print it."""
    import re

    if text.startswith("cak_"):  # the key itself: never echoed back
        raise argparse.ArgumentTypeError(
            "that is a key, not its id: revoke it by its id (key_..., see `keys list`)")
    if re.fullmatch(r"key_[0-9a-f]{24}", text) is None:
        raise argparse.ArgumentTypeError(
            f"{text[:60]!r} is not a key id: key_ and 24 hex digits (see `keys list`)")
    return text


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_keys(args: argparse.Namespace) -> int:
    command = f"keys {args.action}"
    if args.action == "create":
        made = _with_postgres(args.config, command, lambda pg: pg.create_key(
            user_id=args.user, name=args.name))
        if made is None:
            return 1
        key_id, key = made
        print(f"created API key {key_id} for user {args.user}"
              + (f" ({args.name})" if args.name else ""))
        print("the key is shown this once (only its SHA-256 is stored); send it as "
              "Authorization: Bearer <key>")
        print(key)  # the last line alone: `| tail -1`
        return 0
    if args.action == "list":
        keys = _with_postgres(args.config, command, lambda pg: pg.list_keys(user_id=args.user))
        if keys is None:
            return 1
        head = ("id", "name", "user", "shown", "created (UTC)", "last used", "revoked")
        _print_table(head, [(k["id"], k["name"] or "-", k["user"], k["shown"],
                             _when(k["created"]), _when(k["last_used"]), _when(k["revoked"]))
                            for k in keys], len(head))
        return 0
    revoked = _with_postgres(args.config, command, lambda pg: pg.revoke_key(args.key_id))
    if revoked is None:
        return 1
    if not revoked:
        print(f"chat-actors keys revoke: no key {args.key_id} (`keys list` shows the ids)",
              file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}: every gateway refuses it within 5 s")
    return 0


def cmd_contract(args: argparse.Namespace) -> int:
    from tools import contract

    if args.write:
        changed = contract.write()
        print("\n".join(f"wrote docs/{path}" for path in changed) or "docs/ is up to date")
        return 0
    drifted = contract.drifted()
    for path in drifted:
        print(f"docs/{path} differs from the code: run bin/chat-actors contract --write",
              file=sys.stderr)
    return 1 if drifted else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    import trio

    from actors.adapters.postgres import Postgres, redact
    from actors.errors import TransientError

    config = _config(args.config)
    pg = Postgres.of(config.postgres, pool_size=1)
    try:
        applied = trio.run(pg.migrate)
    except TransientError as exc:
        print(f"chat-actors: postgres at {redact(config.postgres.dsn)}: {exc}", file=sys.stderr)
        return 1
    finally:
        pg.close()
    print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
    return 0


def _attachment(path_or_url: str, max_bytes: int) -> dict[str, str]:
    """`--image PATH` as a data URL (its format read from its bytes), or an https URL
    as given (the worker checks its host)."""
    from messages.images import MEDIA_TYPES, ImageProblem, image_size

    if path_or_url.startswith("https://"):
        return {"type": "image", "url": path_or_url}
    try:
        data = Path(path_or_url).read_bytes()
    except OSError as exc:
        raise ValueError(f"--image {path_or_url}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ValueError(f"--image {path_or_url}: {len(data)} bytes; "
                         f"limits.max_attachment_bytes is {max_bytes}")
    for kind in MEDIA_TYPES:
        try:
            image_size(kind, data)
        except ImageProblem:
            continue
        encoded = base64.b64encode(data).decode()
        return {"type": "image", "url": f"data:image/{kind};base64,{encoded}"}
    raise ValueError(f"--image {path_or_url}: not a PNG, JPEG, WebP or GIF image")


def _v2_fields(tools_file: str | None, results: Sequence[str], images: Sequence[str] = (),
               max_image_bytes: int = 512 * 1024) -> dict[str, Any]:
    """`--tools FILE` (a JSON array of {name, description, parameters}), each
    `--tool-result CALL_ID=CONTENT` and each `--image PATH` as contract v2 fields."""
    extra: dict[str, Any] = {}
    if images:
        extra["attachments"] = [_attachment(image, max_image_bytes) for image in images]
    if tools_file:
        try:
            tools = json.loads(Path(tools_file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"--tools {tools_file}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ValueError(f"--tools {tools_file}: not JSON ({exc})") from None
        if not isinstance(tools, list):
            raise ValueError(f"--tools {tools_file}: a JSON array of tools is expected")
        extra["tools"] = tools
    answered = []
    for item in results:
        call_id, sep, content = item.partition("=")
        if not sep or not call_id:
            raise ValueError(f"--tool-result {item!r}: expected CALL_ID=CONTENT")
        answered.append({"toolCallId": call_id, "content": content})
    if answered:
        extra["toolResults"] = answered
    return {"v": 2, **extra} if extra else {}


def cmd_send(args: argparse.Namespace) -> int:
    with _config_or_dev(args.config, "send") as (config, _):
        return _send(args, config)


def _send(args: argparse.Namespace, config: Any) -> int:
    from tools.chat_client import ChatClient, Unreachable, print_answer

    try:
        extra = _v2_fields(args.tools, args.tool_result, args.image,
                           config.limits.max_attachment_bytes)
    except ValueError as exc:
        print(f"chat-actors send: {exc}", file=sys.stderr)
        return 2
    client = ChatClient(config, timeout_s=args.timeout)
    try:
        job_id, after = client.send(args.text, user_id=args.user, session_id=args.session,
                                    model=args.model, **extra)
        print(f"[job {job_id}]", file=sys.stderr)
        status = print_answer(client, job_id, after)
    except Unreachable as exc:
        hint = ("" if args.config else "; with no --config, `send` talks to the "
                "`bin/chat-actors dev` running in another terminal")
        print(f"chat-actors send: {exc}{hint}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0 if status == "completed" else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    from tools.chat_client import ChatClient, Unreachable

    with _config_or_dev(args.config, "cancel") as (config, _):
        client = ChatClient(config, timeout_s=args.timeout)
    try:
        client.cancel(args.job_id, user_id=args.user, reason=args.reason)
    except Unreachable as exc:
        print(f"chat-actors cancel: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"cancel sent for {args.job_id}")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from tools.devstack import run_dev

    return run_dev(once=args.once, keep=args.keep, rag=args.rag)


def cmd_ingest(args: argparse.Namespace) -> int:
    logging.getLogger("chromadb").setLevel(logging.ERROR)
    with _config_or_dev(args.config, "ingest", postgres=True) as (config, _):
        return _ingest(args, config)


def _ingest(args: argparse.Namespace, config: Any) -> int:
    from actors.adapters.rag.documents import DocumentStore
    from actors.errors import PermanentError, TransientError
    from tools.ingest import freshness, ingest, refresh

    store = DocumentStore.from_config(config)
    try:
        if args.status or args.refresh:
            if args.refresh:
                print(f"re-embedded {refresh(store, config, args.collection)} stale chunks")
            state = freshness(store, config, args.collection)
            print(f"{args.collection}: {state.total} chunks; {len(state.other_model)} embedded "
                  f"with another model, {len(state.too_old)} older than "
                  f"{config.rag.max_age_days:g} days")
            return 0
        if not args.paths:
            print("chat-actors ingest: give files or folders to ingest", file=sys.stderr)
            return 2
        report = ingest(store, config, args.collection, [Path(p) for p in args.paths],
                        dry_run=args.dry_run, root=Path.cwd())
    except (PermanentError, TransientError) as exc:  # one line: which part, where, why
        print(f"chat-actors ingest: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(("would change: " if args.dry_run else "") + report.summary())
    if args.dry_run:
        for label, ids in (("add", report.added), ("replace", report.changed),
                           ("delete", report.deleted)):
            for chunk_id in ids:
                print(f"  {label} {chunk_id}")
    return 0


# Modules of bench/ that are not benchmarks, and what they are.
NOT_BENCHMARKS = {"vendor": "the scripted vendor the benchmarks start (python -m bench.vendor)",
                  "paced_vendor": "the scripted vendor at a steady token rate bench frontdoor "
                                  "starts (python -m bench.paced_vendor)",
                  "openai_load": "the streaming load generator bench frontdoor runs "
                                 "(python -m bench.openai_load)"}


def benchmarks() -> list[str]:
    """What `bench NAME` runs: the modules of bench/, but for those that are not benchmarks.
    Each takes --quick and --json (tests/test_bench_quick.py runs every one)."""
    return sorted(p.stem for p in (ROOT / "bench").glob("*.py")
                  if not p.stem.startswith("_") and p.stem not in NOT_BENCHMARKS)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally` that stops a process


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib
    import signal

    if args.name in NOT_BENCHMARKS:
        print(f"chat-actors bench: {args.name} is not a benchmark but "
              f"{NOT_BENCHMARKS[args.name]}", file=sys.stderr)
        return 2
    names = benchmarks()
    if args.name not in names:
        print(f"chat-actors bench: unknown benchmark {args.name!r} (have: {', '.join(names)})",
              file=sys.stderr)
        return 2
    # A benchmark starts a local stack and processes of its own. Stopped by SIGTERM (a
    # test's timeout, a CI job cancelled) it stops them on its way out, as on Ctrl-C.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    return int(importlib.import_module(f"bench.{args.name}").main(args.bench_args) or 0)


# Checks that run before the tests, each failing the command on its own: style, the
# layering of imports (pyproject.toml [tool.importlinter]), types ([tool.basedpyright]).
CHECKS = (
    ("ruff", ["-m", "ruff", "check", "--quiet", "."]),
    ("import-linter", ["-c", "from importlinter.cli import lint_imports_command; "
                             "lint_imports_command()", "--no-cache"]),
    # Against the interpreter running the tests, wherever its venv is (CHAT_ACTORS_VENV).
    ("basedpyright", ["-m", "basedpyright", "--level", "error", "--pythonpath", sys.executable]),
)


# Debian packages some tests need (the browser test, the PgBouncer tests); installed
# by `test` when it runs as root (CI does); otherwise those tests are reported by name
# as not run.
DEBIAN_PACKAGES = {"chromium": "/usr/bin/chromium", "chromium-driver": "/usr/bin/chromedriver",
                   "pgbouncer": "/usr/sbin/pgbouncer",
                   # tests/clients: the official openai npm package and the Vercel AI SDK
                   "nodejs": "/usr/bin/node", "npm": "/usr/bin/npm"}


def _debian_packages() -> None:
    import shutil
    import subprocess

    missing = [name for name, path in DEBIAN_PACKAGES.items() if not Path(path).exists()]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"chat-actors test: {', '.join(missing)} not installed (needs root and apt-get): "
              "the tests that need them are reported as not run", file=sys.stderr)
        return
    started = time.monotonic()
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(install, capture_output=True, text=True, env=env)
    if done.returncode:  # the package lists may be missing or stale
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        done = subprocess.run(install, capture_output=True, text=True, env=env)
    if done.returncode:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        print(f"chat-actors test: installing {', '.join(missing)} failed ({last[0]}): the tests "
              "that need them are reported as not run", file=sys.stderr)
        return
    print(f"chat-actors test: installed {', '.join(missing)} in "
          f"{time.monotonic() - started:.0f}s", file=sys.stderr)


def cmd_test(args: argparse.Namespace) -> int:
    import subprocess

    os.chdir(ROOT)
    _debian_packages()
    for name, argv in CHECKS:
        started = time.monotonic()
        check = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
        if check.returncode:
            print(check.stdout + check.stderr, file=sys.stderr)
            print(f"chat-actors test: {name} found problems (above)", file=sys.stderr)
            return check.returncode
        print(f"chat-actors test: {name} passed in {time.monotonic() - started:.1f}s",
              file=sys.stderr)
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *args.pytest_args])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chat-actors",
        description="Streaming chat worker: Kafka requests -> LiteLLM -> Redis Streams events, "
                    "with job records in Postgres.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            Config: config/default.toml < --config FILE < CHAT_ACTORS__SECTION__KEY env vars.
            Try it: bin/chat-actors dev --once "Why is the sky blue?"
        """))
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", metavar="FILE", help="TOML file overlaid on config/default.toml")
        return sp

    run = with_config(sub.add_parser("run", help="run the worker"))
    run.set_defaults(func=cmd_run)

    dev = sub.add_parser("dev", help="start the embedded local stack + a worker, then chat",
                         description="Starts Kafka (Tansu), Redis, Postgres and SmolLM2 on free "
                                     "loopback ports, and a worker; then each line you type is "
                                     "sent as a chat message. Ctrl-D or Ctrl-C stops everything.")
    dev.add_argument("--once", metavar="TEXT", help="send one message, print the answer, exit")
    dev.add_argument("--keep", action="store_true", help="keep the stack's folder (logs) on exit")
    dev.add_argument("--rag", action="store_true",
                     help="answer from your documents (ingest them into user-dev first)")
    dev.set_defaults(func=cmd_dev)

    send = with_config(sub.add_parser("send", help="send one message to a running worker and "
                                                   "print the streamed answer"))
    send.add_argument("text", help="the message")
    send.add_argument("--user", default="cli-user", help="userId (default: %(default)s)")
    send.add_argument("--session", default="cli-session", help="sessionId (default: %(default)s)")
    send.add_argument("--model", help="model alias from config (default: llm.default_model)")
    send.add_argument("--tools", metavar="FILE",
                      help="a JSON array of tools the model may call ({name, description, "
                           "parameters}); needs an alias that takes tools")
    send.add_argument("--tool-result", action="append", default=[], metavar="CALL_ID=CONTENT",
                      help="answer a tool call of the session's last turn (repeat for each; "
                           "TEXT may then be empty)")
    send.add_argument("--image", action="append", default=[], metavar="PATH",
                      help="attach a PNG, JPEG, WebP or GIF file, or an https:// URL of a host "
                           "in limits.image_url_hosts (repeat for each); needs an alias "
                           "with vision")
    send.add_argument("--timeout", type=float, default=5.0, metavar="S",
                      help="give up on a dependency that does not answer in S seconds "
                           "(default: %(default)s)")
    send.set_defaults(func=cmd_send)

    cancel = with_config(sub.add_parser("cancel", help="ask the workers to cancel a job"))
    cancel.add_argument("job_id")
    cancel.add_argument("--user", required=True, help="the userId that owns the job")
    cancel.add_argument("--reason", default="cancelled from the command line")
    cancel.add_argument("--timeout", type=float, default=5.0, metavar="S",
                        help="give up on a broker that does not answer in S seconds "
                             "(default: %(default)s)")
    cancel.set_defaults(func=cmd_cancel)

    ingest = with_config(sub.add_parser(
        "ingest", help="add documents (text, Markdown, PDF) to a RAG collection",
        description="Chunk, embed and store documents. Re-ingesting keeps unchanged chunks, "
                    "replaces changed ones and deletes vanished ones."))
    ingest.add_argument("paths", nargs="*", metavar="PATH", help="files or folders")
    ingest.add_argument("--collection", required=True,
                        help='the collection, e.g. "user-alice" or a shared one')
    ingest.add_argument("--dry-run", action="store_true", help="only report what would change")
    ingest.add_argument("--status", action="store_true",
                        help="report stale chunks (other embedding model, or too old)")
    ingest.add_argument("--refresh", action="store_true", help="re-embed the stale chunks")
    ingest.set_defaults(func=cmd_ingest)

    contract = sub.add_parser("contract", help="check (or --write) the JSON Schemas and the "
                                               "AsyncAPI document under docs/ against messages/")
    contract.add_argument("--write", action="store_true", help="rewrite the files that drifted")
    contract.set_defaults(func=cmd_contract)

    gateway = with_config(sub.add_parser(
        "gateway", help="the HTTP side: chat page, SSE relay of the events, history, cancel"))
    gateway.set_defaults(func=cmd_gateway)

    migrate = with_config(sub.add_parser("migrate", help="apply the Postgres migrations"))
    migrate.set_defaults(func=cmd_migrate)

    usage = with_config(sub.add_parser(
        "usage", help="tokens and cost by user and model, from llm_jobs"))
    usage.add_argument("--user", help="only this user")
    usage.add_argument("--since", type=since_arg,
                       help="only jobs created since: 2026-11-01, 2026-11-01T12:00, or 24h / 7d / 30m")
    usage.add_argument("--by", choices=("model", "key"), default="model",
                       help="model: a row per user and model alias (the default); key: per "
                            "user, API key and model alias (\"-\": jobs a JWT sent)")
    usage.set_defaults(func=cmd_usage)

    keys = sub.add_parser("keys", help="API keys: create, list, revoke",
                          description="API keys (cak_...) are accepted by the gateway as "
                                      "`Authorization: Bearer <key>` wherever a JWT is.")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = with_config(actions.add_parser(
        "create", help="make a key for a user; the last line printed is the key alone"))
    create.add_argument("--user", required=True, type=user_arg,
                        help="the userId its requests run as")
    create.add_argument("--name", type=key_name_arg, help="a label, e.g. where it is used")
    listed = with_config(actions.add_parser(
        "list", help="id, name, user, prefix and last 4 characters, created, last used, revoked"))
    listed.add_argument("--user", type=user_arg, help="only this user's keys")
    revoke = with_config(actions.add_parser(
        "revoke", help="refuse the key from now on (every gateway within 5 s)"))
    revoke.add_argument("key_id", metavar="ID", type=key_id_arg, help="the key's id (key_...)")
    keys.set_defaults(func=cmd_keys)

    bench = sub.add_parser("bench", help="run a benchmark from bench/ (numbers, not tests)")
    bench.add_argument("name", help=f"the benchmark: {', '.join(benchmarks())}")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER,
                       help="its own options; every one takes --quick (a smoke run) and "
                            "--json FILE (default bench/results/NAME.json)")
    bench.set_defaults(func=cmd_bench)

    test = sub.add_parser("test", help="run the test suite (arguments go to pytest)")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    test.set_defaults(func=cmd_test)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["test"] and not {"-h", "--help"} & set(argv[1:2]):
        # Everything after `test` belongs to pytest, options included.
        return cmd_test(argparse.Namespace(pytest_args=argv[1:]))
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if args.debug:
            raise
        # An operator gets one line; the traceback is one flag away.
        print(f"chat-actors {args.command}: {type(exc).__name__}: {exc} "
              "(--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
