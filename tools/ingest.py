"""`chat-actors ingest`: files and folders into a collection (actors/adapters/rag/ingestion.py).

The collection ends up holding this run's files, each as it is now, and every document
uploaded through the gateway as it was: a document an earlier run put there and this
run's paths no longer hold is deleted; an upload is never changed or deleted, and a
file named like one is refused (rename it).

`--dry-run` reports what would change; `--status` lists stale chunks and `--refresh`
embeds them again.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from actors.adapters.rag.documents import DocumentStore
from actors.adapters.rag.ingestion import IngestReport, UploadConflict, apply, freshness, refresh
from actors.adapters.rag.pdf_child import pdf_text
from actors.errors import PermanentError
from config import Config

__all__ = ["IngestReport", "apply", "discover", "freshness", "ingest", "refresh"]

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
PDF_SUFFIXES = {".pdf"}


def read_document(path: Path, max_pdf_pages: int) -> str:
    if path.suffix.lower() in PDF_SUFFIXES:
        return pdf_text(path, max_pages=max_pdf_pages)
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
    """Ingest files and folders; the documents earlier runs put into the collection that
    these paths no longer hold are deleted (uploads are kept)."""
    documents: dict[str, str] = {}
    skipped: list[str] = []
    files = {(str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)):
             path for path in discover(paths)}
    for source, path in files.items():
        try:
            documents[source] = read_document(path, config.rag.max_pdf_pages)
        except (OSError, ValueError) as exc:
            skipped.append(f"{source} ({exc})")  # kept as it was: it is in this run
    try:
        report = apply(store, config, collection, documents, dry_run=dry_run,
                       remove=lambda source: source not in files,
                       progress=Progress(f"embedding into {collection}"))
    except UploadConflict as exc:
        raise PermanentError("; ".join(
            f"{files[name]}: {collection} has a document {name!r} uploaded through the gateway, "
            "and `ingest` never replaces an upload: rename the file or leave it out"
            for name in exc.names), code="ingest") from None
    report.files, report.skipped_files = len(files), skipped
    return report


