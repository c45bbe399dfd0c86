"""Runs the Node.js clients in tests/clients (the official openai package, the Vercel AI
SDK) against a server and returns what they saw.

The clients are installed once with `npm ci` (exactly the lock, hash-checked; the npm
registry is the only network touched) into a folder of the venv named by the hash of
package.json and package-lock.json, so a later session reuses it. Without Node.js or npm
the test is reported by name as not run.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

CLIENTS = Path(__file__).resolve().parent / "clients"
NPM_CI = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"]
CACHE = Path(sys.prefix) / "node-clients"  # the venv's own, gone with it

_ready: Path | None = None  # this session's folder: the scripts, node_modules linked
_failed = ""  # why the install failed, so later tests fail at once


def _install() -> Path:
    global _ready, _failed
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"Node.js ({tool}) is not installed: the Node.js clients are not run")
    if _failed:
        pytest.fail(_failed)
    if _ready is not None:
        return _ready
    manifests = [CLIENTS / "package.json", CLIENTS / "package-lock.json"]
    key = hashlib.sha256(b"".join(path.read_bytes() for path in manifests)).hexdigest()[:16]
    installed = CACHE / key
    if not installed.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=CACHE))
        fresh.chmod(0o755)
        for path in manifests:
            shutil.copy(path, fresh / path.name)
        done = subprocess.run([*NPM_CI, "--cache", str(CACHE / "npm-cache")], cwd=fresh,
                              capture_output=True, text=True, timeout=600)
        if done.returncode:
            shutil.rmtree(fresh, ignore_errors=True)
            _failed = f"npm ci of tests/clients failed:\n{done.stderr[-3000:]}"
            pytest.fail(_failed)
        try:
            fresh.rename(installed)  # whole or not at all
        except OSError:  # another session got there first
            shutil.rmtree(fresh, ignore_errors=True)
    run = Path(tempfile.mkdtemp(prefix="chat-actors-node-clients-"))
    atexit.register(shutil.rmtree, run, ignore_errors=True)
    (run / "node_modules").symlink_to(installed / "node_modules", target_is_directory=True)
    for script in CLIENTS.glob("*.mjs"):
        shutil.copy(script, run / script.name)
    _ready = run
    return run


def node_installed() -> None:
    """Installs the clients now, or skips the test saying why (no Node.js): for a sync
    fixture of a Trio test, since pytest-trio loses the reason of a skip raised inside
    the test."""
    _install()


def node_client(script: str, job: Mapping[str, object], *, timeout: float = 60) -> dict[str, Any]:
    """Runs tests/clients/<script> on the job (JSON on stdin); returns its last stdout line,
    a JSON object. A script that exits non-zero or prints no JSON fails the test."""
    folder = _install()
    # The packages read OPENAI_BASE_URL, OPENAI_ORG_ID, OPENAI_CUSTOM_HEADERS...: none leak in.
    env = {name: value for name, value in os.environ.items() if not name.startswith("OPENAI_")}
    try:
        done = subprocess.run(["node", str(folder / script)], input=json.dumps(dict(job)), env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=folder)
    except subprocess.TimeoutExpired as stuck:
        stderr = stuck.stderr.decode(errors="replace") if isinstance(stuck.stderr, bytes) else stuck.stderr
        pytest.fail(f"{script} did not finish in {timeout:g}s:\n{(stderr or '')[-3000:]}")
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        pytest.fail(f"{script} exited {done.returncode}:\n{done.stdout[-2000:]}\n"
                    f"{done.stderr[-3000:]}")
    result = json.loads(lines[-1])
    assert isinstance(result, dict), lines[-1]
    return result
