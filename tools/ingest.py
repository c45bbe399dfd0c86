"""`chat-actors ingest`: files and folders into a collection (actors/adapters/ingestion.py).

`--dry-run` reports what would change; `--status` lists stale chunks and `--refresh`
embeds them again.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from actors.adapters.documents import DocumentStore
from actors.adapters.ingestion import IngestReport, apply, freshness, pdf_text, refresh
from actors.errors import PermanentError
from config import Config

__all__ = ["IngestReport", "apply", "discover", "freshness", "ingest", "refresh"]

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
PDF_SUFFIXES = {".pdf"}


def read_document(path: Path) -> str:
    if path.suffix.lower() in PDF_SUFFIXES:
        return pdf_text(path)
    return path.read_text(encoding="utf-8", errors="replace")


def discover(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | PDF_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise PermanentError(f"{path}: no such file or directory", code="ingest")
    return found


class Progress:
    """A one-line progress bar on stderr, when stderr is a terminal."""

    def __init__(self, what: str) -> None:
        self.done, self.what = 0, what

    def __call__(self, n: int, total: int) -> None:
        self.done += n
        if sys.stderr.isatty() and total > 0:
            width = 30
            filled = int(width * min(self.done, total) / total)
            sys.stderr.write(f"\r{self.what} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{self.done}/{total}")
            sys.stderr.flush()
            if self.done >= total:
                sys.stderr.write("\n")


def ingest(store: DocumentStore, config: Config, collection: str, paths: list[Path], *,
           dry_run: bool = False, root: Path | None = None) -> IngestReport:
    """Ingest files and folders; chunks of files that vanished since are deleted."""
    documents: dict[str, str] = {}
    skipped: list[str] = []
    files = discover(paths)
    for path in files:
        source = str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)
        try:
            documents[source] = read_document(path)
        except (OSError, ValueError) as exc:
            skipped.append(f"{source} ({exc})")
    report = apply(store, config, collection, documents, dry_run=dry_run,
                   remove=lambda source: not _still_present(source, root),
                   progress=Progress(f"embedding into {collection}"))
    report.files, report.skipped_files = len(files), skipped
    return report


def _still_present(source: str, root: Path | None) -> bool:
    path = (root / source) if root else Path(source)
    return path.exists()


