"""Make the project's virtualenv exactly uv.lock: every package it lists, at its version,
checked against its hashes, and nothing else.

Run by bin/chat-actors when the venv is missing or pyproject.toml, uv.lock or this file
changed; `bin/chat-actors lock` regenerates uv.lock from pyproject.toml, `bin/chat-actors
sync` makes the venv the lock again. Only the package registry is contacted. uv comes
first, from bin/uv-requirements.txt (pip, --require-hashes) into .uv/<version>/; its
cache (~/.cache/uv, or UV_CACHE_DIR) keeps downloads and the llama-cpp-python wheel it
builds, so a later venv takes seconds.

    python3 bin/bootstrap.py VENV            # install (what bin/chat-actors runs)
    python3 bin/bootstrap.py --check VENV    # is the venv exactly the lock? (the test command)
    python3 bin/bootstrap.py --lock [ARGS]   # uv lock [ARGS]
    ... --project DIR                        # another project than this checkout (tests)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UV_PIN = ROOT / "bin" / "uv-requirements.txt"
LOCK_COMMAND = "bin/chat-actors lock"


class Refused(Exception):
    """An install that would not be exactly the lock; the message says why and what to run."""


def uv_binary() -> Path:
    """uv at the pinned version, installed once with pip in hash-checking mode."""
    version = re.search(r"^uv==(\S+)", UV_PIN.read_text(), re.M)
    if version is None:
        raise Refused(f"{UV_PIN} pins no `uv==VERSION`")
    target = ROOT / ".uv" / version.group(1)
    uv = target / "bin" / "uv"
    if uv.exists():
        return uv
    target.parent.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="install-", dir=target.parent))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", "--no-deps", "--only-binary", ":all:",
                           "--require-hashes", "--target", str(staging), "-r", str(UV_PIN)],
                          capture_output=True, text=True)
    if done.returncode:
        raise Refused(f"installing uv from {UV_PIN.relative_to(ROOT)} failed:\n"
                      f"{(done.stderr or done.stdout).strip()}")
    staging.rename(target)  # whole or not at all: a half-installed uv is never found
    return uv


def explain(output: str) -> str:
    """uv's failure as one line a person can act on, followed by uv's own words."""
    said = output.strip()
    if "needs to be updated" in said or "lockfile needs to be" in said:
        return (f"uv.lock is out of date with pyproject.toml (a dependency was added, removed "
                f"or re-pinned): run `{LOCK_COMMAND}` and commit uv.lock\n{said}")
    if "Hash mismatch" in said or "hash mismatch" in said:
        return ("a downloaded package does not match the hash uv.lock records for it: nothing "
                "was installed from it. A registry or proxy served other bytes under that "
                f"name; do not regenerate the lock to make this pass\n{said}")
    if "not found" in said and "uv.lock" in said:
        return f"uv.lock is missing: run `{LOCK_COMMAND}` and commit it\n{said}"
    return f"installing the locked packages failed:\n{said}"


def _uv(project: Path, venv: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}
    if venv is not None:
        env["UV_PROJECT_ENVIRONMENT"] = str(venv)
    return subprocess.run([str(uv_binary()), *args, "--project", str(project)],
                          capture_output=True, text=True, env=env)


SYNC = ("sync", "--locked", "--all-extras")


def fresh(project: Path) -> None:
    """Refuse a lock that pyproject.toml has moved on from, before anything is made or changed."""
    done = _uv(project, None, "lock", "--check")
    if done.returncode:
        raise Refused(explain(done.stderr + done.stdout))


def install(project: Path, venv: Path) -> None:
    fresh(project)
    first = not (venv / "bin" / "python").exists()
    if first:
        print(f"chat-actors: creating {venv} from uv.lock (first run: a few minutes, "
              "llama-cpp-python compiles once; uv's cache keeps it)", file=sys.stderr)
    started = time.monotonic()
    # A new venv is made with the Python running this (bin/chat-actors: $PYTHON, python3).
    done = _uv(project, venv, *SYNC, *(("--python", sys.executable) if first else ()))
    if done.returncode:
        raise Refused(explain(done.stderr + done.stdout))
    print(f"chat-actors: packages ready in {time.monotonic() - started:.0f}s", file=sys.stderr)


def check(project: Path, venv: Path) -> None:
    """Refuse a venv that differs from the lock: a package not in it, a missing or other version."""
    fresh(project)
    done = _uv(project, venv, *SYNC, "--check")
    if done.returncode == 0:
        return
    said = (done.stderr + done.stdout).strip()
    changes = [line.strip() for line in said.splitlines() if line.strip()[:2] in ("+ ", "- ", "~ ")]
    raise Refused(f"{venv} is not exactly uv.lock (a package installed or removed outside "
                  f"the lock): {'; '.join(changes) or said}. Run `bin/chat-actors sync` to make "
                  "it the lock again")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bootstrap.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=ROOT)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="refuse a venv that is not the lock")
    mode.add_argument("--lock", action="store_true", help="regenerate uv.lock (uv lock ARGS)")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.lock:
            done = _uv(args.project, None, "lock", *args.rest)
            print((done.stderr + done.stdout).strip(), file=sys.stderr)
            return done.returncode
        if len(args.rest) != 1:
            parser.error("give the venv's folder")
        venv = Path(args.rest[0])
        (check if args.check else install)(args.project.resolve(), venv.resolve())
    except Refused as exc:
        print(f"chat-actors: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
