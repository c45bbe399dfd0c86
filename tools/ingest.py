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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from actors.adapters.documents import DocumentStore
from actors.adapters.embeddings import configured_embedder
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
    rag = config.rag
    count = TokenCounter("embedding").count
    report = IngestReport()
    existing = store.chunks_of(collection)
    wanted: dict[str, tuple[str, dict]] = {}
    for path in discover(paths):
        report.files += 1
        source = str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)
        try:
            text = read_document(path)
        except (OSError, ValueError) as exc:
            report.skipped_files.append(f"{source} ({exc})")
            continue
        for index, chunk in enumerate(chunk_text(text, max_tokens=rag.chunk_tokens,
                                                 overlap_tokens=rag.chunk_overlap_tokens,
                                                 count=count)):
            chunk_id = f"{source}#{index}"
            wanted[chunk_id] = (chunk, {"source": source, "chunk_index": index,
                                        "content_hash": content_hash(chunk)})
    sources = {meta["source"] for _, meta in wanted.values()}
    to_embed: list[str] = []
    for chunk_id, (_, meta) in wanted.items():
        old = existing.get(chunk_id)
        if old is None:
            report.added.append(chunk_id)
            to_embed.append(chunk_id)
        elif old.get("content_hash") != meta["content_hash"]:
            report.changed.append(chunk_id)
            to_embed.append(chunk_id)
        else:
            report.unchanged += 1
    # Chunks of the files given that no longer exist (the file shrank or vanished).
    report.deleted = [i for i, m in existing.items()
                      if i not in wanted and (m.get("source") in sources
                                              or not _still_present(m.get("source", ""), root))]
    if dry_run:
        return report
    _embed_and_store(store, config, collection, to_embed,
                     {i: wanted[i] for i in to_embed})
    store.delete(collection, report.deleted)
    store.rebuild_keyword_index(collection)
    return report


def _still_present(source: str, root: Path | None) -> bool:
    path = (root / source) if root else Path(source)
    return path.exists()


def _embed_and_store(store: DocumentStore, config: Config, collection: str, ids: list[str],
                     chunks: dict[str, tuple[str, dict]]) -> None:
    model = configured_embedder(config.rag)
    progress = Progress(len(ids), f"embedding into {collection}")
    for start in range(0, len(ids), 64):
        batch = ids[start:start + 64]
        texts = [chunks[i][0] for i in batch]
        vectors = model.embed(texts)
        now = time.time()
        metas = [{**chunks[i][1], "embedded_at": now, "embedding_model": model.name}
                 for i in batch]
        store.upsert(collection, batch, texts, vectors, metas)
        progress.advance(len(batch))


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
    ids = stale.other_model + stale.too_old
    if not ids:
        return 0
    got = store.documents(collection, ids)
    _embed_and_store(store, config, collection, ids,
                     {i: (text, {k: v for k, v in meta.items()
                                 if k not in ("embedded_at", "embedding_model")})
                      for i, (text, meta) in got.items()})
    return len(ids)
