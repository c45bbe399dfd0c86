"""`chat-actors ARGS` with LiteLLM's import held until a file exists.

    python tests/litellm_held.py RELEASE_FILE run --config FILE

A worker whose aliases need no LiteLLM (actors.adapters.llm.model_map) must become ready
and answer while its loader thread is held here; once RELEASE_FILE exists, LiteLLM
loads as usual. Only running the package is held: finding it (model_map reads its map
file) is not. Test code: the worker itself has no such hook.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class _HeldLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, release: Path) -> None:
        self._loader = loader
        self._release = release

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        print(f"litellm import held until {self._release} exists", file=sys.stderr, flush=True)
        while not self._release.exists():  # a file another process makes: polled
            time.sleep(0.05)
        self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class HoldLiteLLM(importlib.abc.MetaPathFinder):
    def __init__(self, release: Path) -> None:
        self.release = release

    def find_spec(self, fullname: str, path: Any, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "litellm":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None:
            spec.loader = _HeldLoader(spec.loader, self.release)
        return spec


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.meta_path.insert(0, HoldLiteLLM(Path(sys.argv[1])))
    from tools.cli import main

    sys.exit(main(sys.argv[2:]))
