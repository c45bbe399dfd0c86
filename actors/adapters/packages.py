"""Where an installed package keeps its files (the model, broker and database binaries
that registry packages ship)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from actors.errors import PermanentError


class MissingPackage(PermanentError):
    """A package that ships files we need is not installed."""


def package_dir(name: str, ships: str) -> Path:
    """The folder of package `name`; `ships` says what it carries, for the error."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"package {name!r} is not installed; it ships {ships} "
                             "(bin/chat-actors installs it)", code="missing_package")
    return Path(next(iter(spec.submodule_search_locations)))
