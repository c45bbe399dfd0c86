"""README's examples run as written, on a copy of the checkout (what a fresh clone holds).

Every line of a ```sh block, and every `$ bin/chat-actors ...` line of a plain block, is
run by bash from the copy's root, exactly as README shows it, with the real local stack
and the real SmolLM2 model. A README example this file does not know how to check fails
the test, so a new example is checked from the day it is written. The copy shares this
venv (CHAT_ACTORS_VENV), which must be the lock: `bin/chat-actors` would otherwise
rebuild it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEP_TIMEOUT_S = 420  # a real model on two cores, beside the rest of the suite


def examples(readme: str) -> list[tuple[str, list[str]]]:
    """(kind, command lines) of each example: `sh` blocks, and plain blocks' `$ ` lines."""
    found = []
    for fence, body in re.findall(r"^ *```(\w*)\n(.*?)^ *```", readme, re.S | re.M):
        lines = [line.strip() for line in body.splitlines()]
        if fence == "sh":
            commands = [line.split("  #")[0].strip() for line in lines
                        if line and not line.startswith("#")]
        elif fence == "":
            commands = [line[2:].split("  #")[0].strip() for line in lines
                        if line.startswith("$ bin/chat-actors ")]
        else:
            continue
        if commands:
            found.append((fence or "output", commands))
    return found


def marker() -> str:
    """What bin/chat-actors compares with the venv's record of the lock it installed."""
    names = ("pyproject.toml", "uv.lock", "bin/bootstrap.py", "bin/uv-requirements.txt")
    listing = "".join(f"{hashlib.sha256((ROOT / n).read_bytes()).hexdigest()}  {n}\n"
                      for n in names)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    recorded = Path(sys.prefix, ".chat-actors-installed")
    if not recorded.exists() or recorded.read_text().strip() != marker():
        pytest.fail(f"{sys.prefix} is not the venv of uv.lock as it stands: run "
                    "`bin/chat-actors sync` (or the tests through `bin/chat-actors test`)")
    copy = tmp_path_factory.mktemp("clone") / "chat-actors"
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (t.decode() for t in tracked)):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("CHAT_ACTORS__") and name != "PYTHONPATH"}
    env["CHAT_ACTORS_VENV"] = sys.prefix
    yield copy, env
    for pid_file in copy.glob(".dev/postgres/pgdata/postmaster.pid"):
        pytest.fail(f"a Postgres still serves the copy after its commands ended: {pid_file}")


def run(clone, line: str) -> subprocess.CompletedProcess[str]:
    copy, env = clone
    return subprocess.run(["bash", "-c", line], cwd=copy, env=env, capture_output=True,
                          text=True, timeout=STEP_TIMEOUT_S)


def check(line: str, done: subprocess.CompletedProcess[str]) -> None:
    """What each example promises, from README's own words around it."""
    said = done.stdout + done.stderr
    assert done.returncode == 0, f"{line}\n{said[-3000:]}"
    if " --once " in line or line.startswith("bin/chat-actors send "):
        assert "[done: completed" in said, said[-3000:]
        answer = done.stdout.split("[local:")[0]
        assert answer.strip(), said[-3000:]  # tokens streamed before the status line
    if " --rag " in line:
        assert "[source README.md (score " in done.stdout, said[-3000:]
    if line.startswith("bin/chat-actors ingest "):
        assert re.search(r"2 files: \d+ chunks added", done.stdout), said
        assert "using the dev stack's Postgres" in done.stderr, said
    if line.startswith("bin/chat-actors send "):
        assert "using the running dev stack" in done.stderr, said


def test_every_readme_example_runs_as_written(clone):
    readme = (ROOT / "README.md").read_text()
    blocks = examples(readme)
    ran: list[str] = []
    for kind, commands in blocks:
        background: subprocess.Popen[str] | None = None
        for line in commands:
            if line == "bin/chat-actors test":
                continue  # the command running this very test (CI runs it as written)
            if line == "bin/chat-actors dev":
                background = start_interactive_dev(clone)
                ran.append(line)
                continue
            if not re.match(r"bin/chat-actors (dev --|dev --rag --|ingest |send |usage )", line):
                pytest.fail(f"README example {line!r} is not checked here: teach this test "
                            "what it promises")
            done = run(clone, line)
            check(line, done)
            if kind == "output" and line.startswith("bin/chat-actors usage"):
                shown = readme.split(f"$ {line}", 1)[1].splitlines()[1].split()
                assert done.stdout.splitlines()[0].split() == shown, done.stdout
            ran.append(line)
        if background is not None:  # Ctrl-D at its prompt: it stops all it started
            _, said = background.communicate(input="", timeout=60)
            assert background.returncode == 0, said[-3000:]
    assert any(" --rag " in line for line in ran) and "bin/chat-actors dev" in ran


def start_interactive_dev(clone) -> subprocess.Popen[str]:
    """`bin/chat-actors dev` as in a first terminal: its prompt waits on stdin."""
    copy, env = clone
    dev = subprocess.Popen(["bash", "-c", "bin/chat-actors dev"], cwd=copy, env=env,
                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not (copy / ".dev" / "stack.toml").exists():  # written once all is ready
        if dev.poll() is not None or time.monotonic() > deadline:
            dev.kill()
            pytest.fail(f"`bin/chat-actors dev` never became ready: {dev.communicate()[1][-3000:]}")
        time.sleep(0.2)
    return dev
