"""The npm packages the tests drive (tests/clients) install exactly their lock, hash-checked,
and the client scripts run on them.

tests/clients/package-lock.json pins every package with its integrity hash; the tests
install it with `npm ci`, which refuses a lock that package.json has moved on from and
a file whose bytes do not match. Needs Node.js and npm (reported by name as not run
without them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.node_clients import CLIENTS, NPM_CI, node_client


def npm_ci(folder: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the Node.js clients' tests are not run")
    return subprocess.run([*NPM_CI, "--cache", str(cache)], cwd=folder, capture_output=True,
                          text=True, timeout=300)


def copy_of_clients(tmp_path: Path) -> Path:
    folder = tmp_path / "clients"
    folder.mkdir()
    for name in ("package.json", "package-lock.json"):
        shutil.copy(CLIENTS / name, folder / name)
    return folder


def test_every_locked_package_has_a_pinned_version_and_an_integrity_hash():
    lock = json.loads((CLIENTS / "package-lock.json").read_text())
    wanted = json.loads((CLIENTS / "package.json").read_text())["dependencies"]
    packages = {path: entry for path, entry in lock["packages"].items() if path}
    assert packages, "the lock lists no package"
    for path, entry in packages.items():
        assert entry["integrity"].startswith("sha512-"), path
        assert entry["version"][0].isdigit(), path
    for name, version in wanted.items():
        assert version[0].isdigit(), f"{name}: pin an exact version, not {version!r}"
        assert packages[f"node_modules/{name}"]["version"] == version


def test_npm_ci_installs_exactly_the_lock(tmp_path):
    folder = copy_of_clients(tmp_path)
    done = npm_ci(folder, tmp_path / "npm-cache")
    assert done.returncode == 0, done.stderr
    lock = json.loads((folder / "package-lock.json").read_text())
    for path, entry in lock["packages"].items():
        if path:
            installed = json.loads((folder / path / "package.json").read_text())
            assert installed["version"] == entry["version"], path
    on_disk: set[str] = set()  # top-level packages, scoped ones (@scope/name) included
    for entry in (folder / "node_modules").iterdir():
        if entry.name.startswith("@"):
            on_disk |= {f"node_modules/{entry.name}/{scoped.name}" for scoped in entry.iterdir()}
        elif not entry.name.startswith("."):
            on_disk.add(f"node_modules/{entry.name}")
    assert on_disk <= set(lock["packages"]), on_disk - set(lock["packages"])


def test_a_file_that_does_not_match_its_integrity_hash_is_refused(tmp_path):
    folder = copy_of_clients(tmp_path)
    lock = json.loads((folder / "package-lock.json").read_text())
    first = next(path for path in lock["packages"] if path)
    lock["packages"][first]["integrity"] = "sha512-" + "A" * 86 + "=="
    (folder / "package-lock.json").write_text(json.dumps(lock, indent=2))
    done = npm_ci(folder, tmp_path / "npm-cache")  # an empty cache: the bytes are fetched
    assert done.returncode != 0
    assert "EINTEGRITY" in done.stderr, done.stderr[-2000:]
    assert not (folder / first / "package.json").exists()


def test_a_lock_behind_package_json_is_refused(tmp_path):
    folder = copy_of_clients(tmp_path)
    manifest = json.loads((folder / "package.json").read_text())
    manifest["dependencies"]["left-pad"] = "1.3.0"
    (folder / "package.json").write_text(json.dumps(manifest, indent=2))
    done = npm_ci(folder, tmp_path / "npm-cache")
    assert done.returncode != 0
    assert "in sync" in done.stderr and "left-pad" in done.stderr, done.stderr[-2000:]


REFUSED = "http://127.0.0.1:1/v1"  # nothing listens: refused at once, no network touched


def test_the_openai_client_script_reports_a_refused_connection_as_its_error():
    job = {"baseURL": REFUSED, "apiKey": "k", "model": "m", "stream": True,
           "messages": [{"role": "user", "content": "hi"}]}
    result = node_client("openai_chat.mjs", job)
    assert result["ok"] is False and result["error"]["class"] == "APIConnectionError", result
    assert (result["text"], result["chunks"], result["tool_calls"]) == ("", 0, [])
    listed = node_client("openai_chat.mjs", {"op": "models", "baseURL": REFUSED, "apiKey": "k"})
    assert listed["ok"] is False and listed["error"]["class"] == "APIConnectionError", listed


def test_the_ai_sdk_script_reports_a_refused_connection_as_its_error():
    job = {"baseURL": REFUSED, "apiKey": "k", "model": "m",
           "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}
    result = node_client("ai_sdk_stream.mjs", job)
    assert result["ok"] is False and result["text"] == "", result
    assert result["errors"][0]["class"] == "APICallError", result
    assert result["errors"][0]["is_retryable"] is True, result
