"""Commands that meet a dependency they cannot reach end in bounded time with one line
naming it, its address (no credentials) and the cause, and a non-zero exit."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tools.chat_client import print_answer
from tools.local_stack import free_port

DOWN = """
[kafka]
bootstrap_servers = "127.0.0.1:{port}"
[redis]
url = "redis://:pw-secret@127.0.0.1:{port}/0"
"""


def run_cli(tmp_path, *args: str, config_text: str = DOWN) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "down.toml"
    config.write_text(config_text.format(port=free_port()))  # nothing listens on {port}
    return subprocess.run([sys.executable, "-m", "tools.cli", *args, "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_cancel_with_the_broker_down_says_so_in_one_line(tmp_path):
    # It used to print librdkafka's raw %3|...|FAIL| lines and never return.
    done = run_cli(tmp_path, "cancel", "job-1", "--user", "u", "--timeout", "1")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        line for line in done.stderr.strip().splitlines() if line.startswith("chat-actors")]
    assert done.stderr.startswith("chat-actors cancel: kafka at 127.0.0.1:")
    assert "not delivered within 1 s (is the broker up?)" in done.stderr
    assert "|FAIL|" not in done.stderr and "Traceback" not in done.stderr


def assert_one_redacted_line(done: subprocess.CompletedProcess[str], start: str) -> None:
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start)
    assert "Connection refused" in lines[0] and "pw-secret" not in done.stderr


def test_send_with_redis_down_says_so_in_one_line(tmp_path):
    done = run_cli(tmp_path, "send", "hello", "--timeout", "1")
    assert_one_redacted_line(done, "chat-actors send: redis at redis://:***@")


def test_migrate_with_postgres_down_says_so_in_one_line(tmp_path):
    done = run_cli(tmp_path, "migrate", config_text='[postgres]\ndsn = '
                   '"postgresql://u:pw-secret@127.0.0.1:{port}/db"\n')
    assert_one_redacted_line(done, "chat-actors: postgres at postgresql://u:***@")


def test_an_unexpected_error_is_one_line_unless_debug_is_asked(tmp_path):
    config = tmp_path / "odd.toml"
    config.write_text('[kafka.producer]\n"no.such.setting" = "x"\n')
    argv = [sys.executable, "-m", "tools.cli", "send", "hi", "--config", str(config)]
    quiet = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines() == [quiet.stderr.strip()]
    assert quiet.stderr.startswith("chat-actors send: KafkaException: ")
    assert "no.such.setting" in quiet.stderr and "(--debug shows the traceback)" in quiet.stderr
    loud = subprocess.run([argv[0], "-m", "tools.cli", "--debug", *argv[3:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert loud.returncode == 1 and "Traceback (most recent call last)" in loud.stderr


@pytest.mark.parametrize("away", ["refusing", "silent"])
def test_ingest_with_the_chroma_server_away_says_so_in_one_line(tmp_path, away, fresh_dsn):
    # A server that accepted and never answered held `ingest` forever (chromadb waits
    # without a limit); a refusing one ended in a traceback.
    (tmp_path / "doc.txt").write_text("A document about lighthouses.")
    with socket.socket() as silent:
        if away == "silent":  # the kernel accepts connections; nobody ever answers
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
        port = silent.getsockname()[1] if away == "silent" else free_port()
        done = run_cli(tmp_path, "ingest", "--collection", "docs", str(tmp_path / "doc.txt"),
                       config_text=f'[rag]\nchroma_url = "http://127.0.0.1:{port}"\n'
                                   f'chroma_timeout_s = 1\n[postgres]\ndsn = "{fresh_dsn}"\n')
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"chat-actors ingest: chroma at http://127.0.0.1:{port}: ")
    assert ("Connection refused" if away == "refusing" else "no answer in time") in lines[0]


def test_ingest_with_postgres_away_says_so_in_one_line(tmp_path):
    # The keyword index lives in Postgres: without it nothing is ingested by halves.
    (tmp_path / "doc.txt").write_text("A document about lighthouses.")
    done = run_cli(tmp_path, "ingest", "--collection", "docs", str(tmp_path / "doc.txt"),
                   config_text=f'[rag]\npath = "{tmp_path / "rag"}"\n[postgres]\n'
                               'dsn = "postgresql://postgres:pw-secret@127.0.0.1:{port}/x"\n')
    assert_one_redacted_line(done, "chat-actors ingest: postgres: OperationalError: ")
    assert not (tmp_path / "rag" / "chroma").exists()  # nothing was written to Chroma


def test_the_dev_stack_never_continues_an_answer_its_server_cannot(tmp_path):
    """llama-cpp-python's server opens a new assistant turn after a trailing one: a job
    taken over on the dev stack starts over (reason `vendor`), while a self-served
    model the map does not know is otherwise taken to continue (llama-server, Ollama)."""
    from actors.adapters.llm.pricing import ModelPricing
    from actors.capabilities import capabilities_of
    from config import load_config
    from tools.devstack import dev_config

    path = tmp_path / "dev.toml"
    path.write_text(dev_config(kafka="127.0.0.1:1", redis="redis://127.0.0.1:1/0",
                               postgres="postgresql://x@127.0.0.1:1/x",
                               llm="http://127.0.0.1:1/v1", rag_path=tmp_path))
    dev = load_config(path, environ={})
    assert capabilities_of(dev, ModelPricing(), "local").continues is False
    plain = load_config(environ={})  # the shipped default: the same model, no setting
    assert plain.llm.models["local"].continues is None
    assert capabilities_of(plain, ModelPricing(), "local").continues is True


def test_dev_with_a_local_service_that_fails_says_so_in_one_line(monkeypatch, capsys, tmp_path):
    # It used to print the service's log tail over many lines, then delete that log.
    from tools import devstack, local_stack

    started: list[local_stack.Service] = []
    real_kafka, real_redis = local_stack.start_kafka, local_stack.start_redis
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: redis cannot bind it
        port = taken.getsockname()[1]

        def start_kafka(workdir: Path) -> local_stack.Service:
            started.append(real_kafka(workdir))
            return started[-1]

        # The services start at once: Redis alone is given the taken port.
        monkeypatch.setattr(local_stack, "start_kafka", start_kafka)
        monkeypatch.setattr(local_stack, "start_redis",
                            lambda workdir: real_redis(workdir, port=port))
        code = devstack.run_dev(once="hello", keep=False, home=tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"chat-actors dev: redis at redis://127.0.0.1:{port}/0 "
                               "exited with 1: ")
    assert "Address already in use" in lines[0]
    log = Path(lines[0].rsplit("(log: ", 1)[1].removesuffix(")"))
    assert log.is_file()  # kept, since the line names it
    shutil.rmtree(log.parent)
    # Kafka, started beside it, was stopped, and so was the dev Postgres.
    assert started and not local_stack.port_open(started[0].port)
    assert not (tmp_path / "postgres" / "pgdata" / "postmaster.pid").exists()


class ScriptedEvents:
    """The chat client's read side, replaying a job's events."""

    def __init__(self, events: list[tuple[str, dict]]) -> None:
        self._events = events

    def events(self, job_id: str, after: str):
        yield from self._events


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("out", [io.StringIO(), Terminal()])
def test_send_prints_reasoning_apart_from_the_answer(out):
    usage = {"promptTokens": 3, "completionTokens": 2}
    print_answer(ScriptedEvents([
        ("started", {"model": "m", "mode": "gen", "attempt": 1}),
        ("reasoning", {"text": "Six times"}), ("reasoning", {"text": " seven."}),
        ("token", {"text": "42"}),
        ("final", {"model": "m", "usage": usage, "costUsd": 0.0}),
        ("done", {"status": "completed", "partial": False})]), "job", "0-0", out=out)
    text = out.getvalue()
    if isinstance(out, Terminal):
        assert text.startswith("\x1b[2mSix times seven.\x1b[0m\n42\n")
    else:
        assert text.startswith("[reasoning: Six times seven.]\n42\n")


def _printed(second: dict[str, object], *texts: str) -> str:
    """What `send` prints for attempt 1 streaming texts[0], then attempt 2 starting with
    `second` (its resumes or restarts) and streaming texts[1]."""
    out = io.StringIO()
    usage = {"promptTokens": 3, "completionTokens": 2}
    # ChatClient.events names each entry's attempt in its data, as the gateway does.
    print_answer(ScriptedEvents([
        ("started", {"model": "m", "mode": "gen", "attempt": 1}),
        ("token", {"text": texts[0], "attempt": 1}),
        ("started", {"model": "m", "mode": "gen", "attempt": 2, **second}),
        ("token", {"text": texts[1], "attempt": 2}),
        ("final", {"model": "m", "usage": usage, "costUsd": 0.0}),
        ("done", {"status": "completed", "partial": False})]), "job", "0-0", out=out)
    return out.getvalue()


def test_send_shows_a_continued_answer_once_and_a_restart_as_such():
    continued = _printed({"resumes": {"attempt": 1, "chars": 8}}, "The sky ", "is blue.")
    assert continued.startswith("The sky is blue.\n[m:")  # nothing repeated
    # The screen ran past what attempt 2 continues: it is redrawn.
    cut = _printed({"resumes": {"attempt": 1, "chars": 4}}, "The sky is", "clouds")
    assert cut.startswith(
        "The sky is\n[attempt 2: continuing after 4 characters]\nThe clouds\n")
    restarted = _printed({"restarts": {"attempt": 1, "reason": "think_block"}}, "<think>",
                         "Blue.")
    assert restarted.startswith(
        "<think>\n[attempt 2: restarting the answer (think_block)]\nBlue.\n")


@pytest.mark.parametrize("hits", [[], [{"id": "c1", "score": 0.91, "source": "README.md",
                                        "snippet": "bin/chat-actors test"}]])
def test_a_rag_answer_says_which_sources_it_drew_on_or_that_there_were_none(hits):
    out = io.StringIO()
    usage = {"promptTokens": 3, "completionTokens": 2}
    print_answer(ScriptedEvents([
        ("started", {"model": "m", "mode": "rag", "attempt": 1}),
        ("retrieval", {"step": "vector", "query": "q", "hits": hits}),
        ("retrieval", {"step": "rerank", "query": "q", "hits": hits}),
        ("token", {"text": "Run it."}),
        ("final", {"model": "m", "usage": usage, "costUsd": 0.0}),
        ("done", {"status": "completed", "partial": False})]), "job", "0-0", out=out)
    first = out.getvalue().splitlines()[0]
    assert first == ("[source README.md (score 0.91)]" if hits else
                     "[no sources found: the answer draws on none of your documents]")


def test_send_takes_tools_from_a_file_and_says_what_is_wrong_with_one(tmp_path):
    from tools.cli import _v2_fields

    tools = tmp_path / "tools.json"
    tools.write_text('[{"name": "get_weather", "parameters": {"type": "object"}}]')
    assert _v2_fields(str(tools), ["call_1=21 C"]) == {
        "v": 2, "tools": [{"name": "get_weather", "parameters": {"type": "object"}}],
        "toolResults": [{"toolCallId": "call_1", "content": "21 C"}]}
    assert _v2_fields(None, []) == {}  # a plain v1 request
    tools.write_text('{"name": "f"}')
    with pytest.raises(ValueError, match="a JSON array of tools is expected"):
        _v2_fields(str(tools), [])
    with pytest.raises(ValueError, match="No such file"):
        _v2_fields(str(tmp_path / "missing.json"), [])
    with pytest.raises(ValueError, match="expected CALL_ID=CONTENT"):
        _v2_fields(None, ["no-equals-sign"])
    out = io.StringIO()
    print_answer(ScriptedEvents([
        ("tool_call", {"index": 0, "id": "call_1", "name": "get_weather",
                       "arguments": '{"city": "Paris"}'}),
        ("done", {"status": "completed", "partial": False})]), "job", "0-0", out=out)
    assert out.getvalue().startswith('\n[tool call call_1: get_weather({"city": "Paris"})]')


def test_send_attaches_an_image_file_by_its_own_format(tmp_path):
    """`send --image`: the format is read from the bytes (not the file name), a URL
    passes as given, and a file that is no image, or too big, is refused by name."""
    from tests.images import data_url, gif_header, png
    from tools.cli import _v2_fields

    picture, named_wrong, text = tmp_path / "p.png", tmp_path / "really-a-gif.png", tmp_path / "t.png"
    picture.write_bytes(png(5, 4))
    named_wrong.write_bytes(gif_header(3, 3))
    text.write_text("not an image")
    link = "https://images.example.com/a.webp"
    assert _v2_fields(None, [], [str(picture), str(named_wrong), link]) == {"v": 2, "attachments": [
        {"type": "image", "url": data_url("png", png(5, 4))},
        {"type": "image", "url": data_url("gif", gif_header(3, 3))},
        {"type": "image", "url": link}]}
    with pytest.raises(ValueError, match="t.png: not a PNG, JPEG, WebP or GIF image"):
        _v2_fields(None, [], [str(text)])
    with pytest.raises(ValueError, match="limits.max_attachment_bytes is 10"):
        _v2_fields(None, [], [str(picture)], max_image_bytes=10)
    with pytest.raises(ValueError, match="No such file"):
        _v2_fields(None, [], [str(tmp_path / "missing.png")])


def test_the_dev_postgres_is_one_server_kept_across_runs_and_stopped_by_its_starter(tmp_path):
    # `ingest` or `usage` without --config while a `dev` runs use its Postgres, never a
    # second server on the same data; the one that started it stops it, and the data stays.
    import psycopg

    from tools import devstack

    data = tmp_path / "postgres" / "pgdata"
    with devstack.dev_postgres(tmp_path) as first:
        with psycopg.connect(first, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (n int)")
        with devstack.dev_postgres(tmp_path) as second:
            assert second == first
        assert (data / "postmaster.pid").exists()  # the inner user did not stop it
    assert not (data / "postmaster.pid").exists()
    with devstack.dev_postgres(tmp_path) as again, psycopg.connect(again) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)


def test_a_stack_port_is_never_one_the_kernel_may_hand_to_a_connection():
    """Three stacks starting side by side once lost a Redis port to another process's
    outgoing connection between picking it and binding it ("Address already in use"):
    the stack picks its ports below the kernel's ephemeral range."""
    from tools.local_stack import _ephemeral_low

    low = _ephemeral_low()
    ports = {free_port() for _ in range(50)}
    assert all(port < low for port in ports), sorted(ports)
    assert len(ports) > 1  # picked at random, not one port for everybody
