"""Create the project's virtualenv and install the pinned packages of pyproject.toml.

Run by bin/chat-actors when .venv is missing or pyproject.toml changed. Only
the package registry is contacted; pip's cache (~/.cache/pip) keeps built
wheels, so llama-cpp-python compiles once per machine (3-5 minutes).
"""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(target: str) -> int:
    venv_dir = Path(target)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = list(project["project"]["dependencies"])
    for extra in ("local", "test", "bench"):
        wanted += project["project"]["optional-dependencies"][extra]
    no_deps = project["tool"]["chat-actors"]["no-deps"]
    started = time.monotonic()
    if not (venv_dir / "bin" / "python").exists():
        print(f"chat-actors: creating {venv_dir} (first run: a few minutes, "
              "llama-cpp-python compiles once)", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(venv_dir)
    pip = [str(venv_dir / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    quiet = ["-q"] if sys.stderr.isatty() is False else []
    subprocess.run([*pip, "install", *quiet, *wanted], check=True)
    subprocess.run([*pip, "install", *quiet, "--no-deps", *no_deps], check=True)
    print(f"chat-actors: packages ready in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
