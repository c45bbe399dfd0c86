"""`chat-actors ingest`: files -> chunks -> embeddings -> the document store.

Re-ingesting is incremental: a chunk whose text is unchanged is kept (its
embedding too), a changed one is replaced, and chunks of vanished text or
files are deleted. `--dry-run` reports what would change. Chunks embedded with
another model, or longer ago than rag.max_age_days, are stale: `--status`
lists them and `--refresh` embeds them again.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from actors.adapters.documents import DocumentStore
from actors.adapters.embeddings import configured_embedder
from actors.adapters.keywords import Chunk, Superseded
from actors.adapters.tokens import TokenCounter
from actors.errors import PermanentError
from config import Config
from tools.chunking import chunk_text

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
PDF_SUFFIXES = {".pdf"}


@dataclass
class IngestReport:
    files: int = 0
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.files} files: {len(self.added)} chunks added, {len(self.changed)} changed, "
                f"{self.unchanged} unchanged, {len(self.deleted)} deleted"
                + (f"; skipped {', '.join(self.skipped_files)}" if self.skipped_files else ""))


def read_document(path: Path) -> str:
    if path.suffix.lower() in PDF_SUFFIXES:
        from pypdf import PdfReader

        return "\n\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
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


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Progress:
    """A one-line progress bar on stderr, when stderr is a terminal."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.done, self.what = total, 0, what
        self.live = sys.stderr.isatty() and total > 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.live:
            width = 30
            filled = int(width * self.done / self.total)
            sys.stderr.write(f"\r{self.what} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{self.done}/{self.total}")
            sys.stderr.flush()
            if self.done >= self.total:
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
                   remove=lambda source: not _still_present(source, root))
    report.files, report.skipped_files = len(files), skipped
    return report


PUBLISH_TRIES = 5  # each a fresh read of the collection, when another ingest came first


def apply(store: DocumentStore, config: Config, collection: str, documents: dict[str, str], *,
          remove: Callable[[str], bool] = lambda source: False,
          dry_run: bool = False) -> IngestReport:
    """Make the collection hold `documents` (source -> text) in place of those sources'
    earlier text, without the other sources `remove` names, and every other source as
    it was: the one path of the CLI and the gateway's uploads. Embeds only the text it
    has no vector for, then publishes the whole collection in one step; when another
    ingest published first, it reads the collection again and retries (its vectors are
    kept, so nothing is embedded twice)."""
    wanted = _chunked(config, documents)
    for attempt in range(PUBLISH_TRIES):
        generation, current = store.snapshot(collection)
        report, chunks = _plan(current, dict(wanted), documents, remove)
        if dry_run:
            return report
        fresh = [c for c in chunks if "embedding_model" not in c.metadata]
        present = store.vectors_present(collection, [c.vector_id for c in fresh])
        done = _embed_and_store(store, config, collection,
                                [c for c in fresh if c.vector_id not in present])
        for c in fresh:
            if c.vector_id in present:
                stamp = {k: present[c.vector_id][k] for k in ("embedded_at", "embedding_model")
                         if k in present[c.vector_id]}
                done[c.chunk_id] = replace(c, metadata={**c.metadata, **stamp})
        try:
            store.publish(collection, [done.get(c.chunk_id, c) for c in chunks],
                          based_on=generation, replaced=current.values())
        except Superseded:
            if attempt == PUBLISH_TRIES - 1:
                raise
            continue
        return report
    raise AssertionError("unreachable")


def _chunked(config: Config, documents: dict[str, str]) -> dict[str, Chunk]:
    rag = config.rag
    count = TokenCounter("embedding").count
    wanted: dict[str, Chunk] = {}
    for source, text in documents.items():
        text = text.replace("\x00", "")
        for index, piece in enumerate(chunk_text(text, max_tokens=rag.chunk_tokens,
                                                 overlap_tokens=rag.chunk_overlap_tokens,
                                                 count=count)):
            chunk_id = f"{source}#{index}"
            digest = content_hash(piece)
            wanted[chunk_id] = Chunk(chunk_id=chunk_id, vector_id=f"{chunk_id}@{digest[:16]}",
                                     source=source, text=piece, metadata={
                                         "source": source, "chunk_index": index,
                                         "content_hash": digest})
    return wanted


def _plan(current: dict[str, Chunk], wanted: dict[str, Chunk], documents: dict[str, str],
          remove: Callable[[str], bool]) -> tuple[IngestReport, list[Chunk]]:
    """What changes, and the collection's chunks after it."""
    report = IngestReport(files=len(documents))
    for chunk_id, chunk in wanted.items():
        old = current.get(chunk_id)
        if old is None:
            report.added.append(chunk_id)
        elif old.metadata.get("content_hash") != chunk.metadata["content_hash"]:
            report.changed.append(chunk_id)
        else:
            report.unchanged += 1
            wanted[chunk_id] = old  # its vector and embedding metadata stay
    # Chunks of the sources given that are gone (the text shrank), or of removed sources.
    report.deleted = [i for i, c in current.items() if i not in wanted and (
        c.source in documents or remove(c.source))]
    gone = set(report.deleted)
    kept = [c for i, c in current.items() if i not in wanted and i not in gone]
    return report, [*kept, *wanted.values()]


def _still_present(source: str, root: Path | None) -> bool:
    path = (root / source) if root else Path(source)
    return path.exists()


def _embed_and_store(store: DocumentStore, config: Config, collection: str,
                     chunks: list[Chunk]) -> dict[str, Chunk]:
    """Embed `chunks` and write their vectors; the chunks with their embedding
    metadata, by chunk id."""
    model = configured_embedder(config.rag)
    progress = Progress(len(chunks), f"embedding into {collection}")
    done: dict[str, Chunk] = {}
    for start in range(0, len(chunks), 64):
        batch = chunks[start:start + 64]
        vectors = model.embed([c.text for c in batch])
        now = time.time()
        stamped = [replace(c, metadata={**c.metadata, "embedded_at": now,
                                        "embedding_model": model.name}) for c in batch]
        store.upsert(collection, [c.vector_id for c in stamped], [c.text for c in stamped],
                     vectors, [{**c.metadata, "chunk_id": c.chunk_id} for c in stamped])
        done |= {c.chunk_id: c for c in stamped}
        progress.advance(len(batch))
    return done


@dataclass
class Freshness:
    total: int
    other_model: list[str]
    too_old: list[str]


def freshness(store: DocumentStore, config: Config, collection: str) -> Freshness:
    chunks = store.chunks_of(collection)
    oldest = time.time() - config.rag.max_age_days * 86400
    other = [i for i, m in chunks.items()
             if m.get("embedding_model") != config.rag.embedding_model]
    old = [i for i, m in chunks.items()
           if i not in other and float(m.get("embedded_at", 0)) < oldest]
    return Freshness(len(chunks), other, old)


def refresh(store: DocumentStore, config: Config, collection: str) -> int:
    """Embed the stale chunks again with the configured model; return how many."""
    stale = freshness(store, config, collection)
    ids = set(stale.other_model + stale.too_old)
    if not ids:
        return 0
    generation, current = store.snapshot(collection)
    embedded = _embed_and_store(store, config, collection, [
        replace(c, metadata={k: v for k, v in c.metadata.items()
                             if k not in ("embedded_at", "embedding_model")})
        for i, c in current.items() if i in ids])
    store.publish(collection, [embedded.get(i, c) for i, c in current.items()],
                  based_on=generation)
    return len(ids)
