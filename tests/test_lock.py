"""bin/bootstrap.py installs exactly a lock: checked hashes, nothing beside it, never a stale lock.

A project of its own in a folder, with a package index served over loopback (PEP 503
pages and wheels made here), is locked and installed by the real bootstrap and the real
uv, the same code path `bin/chat-actors` takes for this repository.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = ROOT / "bin" / "bootstrap.py"


def wheel(folder: Path, name: str, version: str, body: str) -> Path:
    """A minimal pure-Python wheel: one module, its metadata and RECORD."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": body,
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}

    def digest(text: str) -> str:
        raw = hashlib.sha256(text.encode()).digest()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    record = "".join(f"{path},sha256={digest(text)},{len(text.encode())}\n"
                     for path, text in files.items()) + f"{dist}/RECORD,,\n"
    path = folder / name / f"{name}-{version}-py3-none-any.whl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in {**files, f"{dist}/RECORD": record}.items():
            archive.writestr(member, text)
    # As PyPI does, each link carries its file's hash (uv records the hashes it is given).
    (folder / name / "index.html").write_text("".join(
        f'<a href="{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">{w.name}</a>\n'
        for w in sorted(path.parent.glob("*.whl"))))
    return path


@pytest.fixture
def index(tmp_path):
    """A package index on loopback serving `tmp_path/simple`: (url, folder)."""
    folder = tmp_path / "simple"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", folder
    finally:
        server.shutdown()
        server.server_close()


def project(folder: Path, index_url: str, dependencies: list[str]) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "pyproject.toml").write_text(f"""\
[project]
name = "fixture"
version = "0"
requires-python = ">=3.11"
dependencies = {dependencies!r}

[tool.uv]
package = false

[[tool.uv.index]]
name = "here"
url = "{index_url}/"
default = true
""".replace("'", '"'))
    return folder


def bootstrap(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UV_CACHE_DIR": str(tmp_path / "uv-cache")}
    return subprocess.run([sys.executable, str(BOOTSTRAP), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def installed(venv: Path) -> set[str]:
    done = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import importlib.metadata as m; "
                           "print('\\n'.join(sorted(d.metadata['Name'] for d in m.distributions())))"],
                          capture_output=True, text=True, check=True)
    return set(done.stdout.split())


@pytest.fixture
def locked(tmp_path, index):
    """A project locked against the index: tinypkg 1.0 and its hash in uv.lock."""
    url, folder = index
    wheel(folder, "tinypkg", "1.0", "VALUE = 1\n")
    wheel(folder, "strayed", "2.0", "VALUE = 2\n")
    here = project(tmp_path / "fixture", url, ["tinypkg==1.0"])
    done = bootstrap(tmp_path, "--project", str(here), "--lock")
    assert done.returncode == 0, done.stderr
    lock = (here / "uv.lock").read_text()
    assert 'name = "tinypkg"' in lock and "sha256:" in lock
    return here, folder, url


def test_the_venv_is_exactly_the_lock_and_the_check_agrees(tmp_path, locked):
    here, _, _ = locked
    venv = tmp_path / "venv"
    done = bootstrap(tmp_path, "--project", str(here), str(venv))
    assert done.returncode == 0, done.stderr
    assert installed(venv) == {"tinypkg"}  # nothing the lock does not list: not even pip
    assert bootstrap(tmp_path, "--project", str(here), "--check", str(venv)).returncode == 0


def test_a_package_that_does_not_match_its_hash_is_refused(tmp_path, locked):
    here, folder, _ = locked
    # Other bytes under the same name, the index advertising their hash: a registry or
    # proxy that serves what it likes. Only the lock's hash stands between.
    wheel(folder, "tinypkg", "1.0", "VALUE = 'other bytes under the same name'\n")
    venv = tmp_path / "venv"
    done = bootstrap(tmp_path, "--project", str(here), str(venv))
    assert done.returncode == 1
    said = done.stderr
    assert ("\nchat-actors: a downloaded package does not match the hash uv.lock records for "
            "it: nothing was installed from it") in said, said
    assert "tinypkg" in said
    assert not (venv / "lib").exists() or "tinypkg" not in installed(venv)


def test_a_package_installed_beside_the_lock_is_refused_by_the_check(tmp_path, locked):
    here, _, url = locked
    venv = tmp_path / "venv"
    assert bootstrap(tmp_path, "--project", str(here), str(venv)).returncode == 0
    uv = next((ROOT / ".uv").glob("*/bin/uv"))  # the one the bootstrap installed
    subprocess.run([str(uv), "pip", "install", "--python", str(venv / "bin" / "python"),
                    "--index-url", url + "/", "strayed==2.0"],
                   capture_output=True, check=True, env={**os.environ,
                                                         "UV_CACHE_DIR": str(tmp_path / "c")})
    done = bootstrap(tmp_path, "--project", str(here), "--check", str(venv))
    assert done.returncode == 1
    assert "is not exactly uv.lock" in done.stderr and "strayed" in done.stderr, done.stderr
    assert "bin/chat-actors sync" in done.stderr
    # And an install makes it the lock again.
    assert bootstrap(tmp_path, "--project", str(here), str(venv)).returncode == 0
    assert installed(venv) == {"tinypkg"}


def test_a_lock_out_of_date_with_pyproject_is_refused_naming_the_command(tmp_path, locked):
    here, _, url = locked
    project(here, url, ["tinypkg==1.0", "strayed==2.0"])
    venv = tmp_path / "venv"
    for args in ([str(venv)], ["--check", str(venv)]):
        done = bootstrap(tmp_path, "--project", str(here), *args)
        assert done.returncode == 1
        assert done.stderr.startswith(
            "chat-actors: uv.lock is out of date with pyproject.toml"), done.stderr
        assert "run `bin/chat-actors lock`" in done.stderr
    assert not venv.exists()  # refused before anything was made
