"""Ingestion: documents -> chunks -> embeddings -> the document store, in one step.

The one path of `chat-actors ingest` and of the gateway's uploads. Re-ingesting is
incremental: a chunk whose text is unchanged is kept (its embedding too), a changed
one is replaced, and chunks of vanished text are deleted. Chunks embedded with
another model, or longer ago than rag.max_age_days, are stale: `freshness` lists
them and `refresh` embeds them again. Blocking: run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from actors.adapters.documents import DocumentStore
from actors.adapters.embeddings import configured_embedder
from actors.adapters.keywords import Chunk, Superseded
from actors.adapters.tokens import TokenCounter
from actors.chunking import chunk_text
from actors.errors import DocumentRefused
from config import Config

MAX_PDF_PAGES = 2000
Progress = Callable[[int, int], None]  # (chunks just embedded, chunks to embed)


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


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def pdf_text(data: bytes | Path, max_pages: int = MAX_PDF_PAGES) -> str:
    """The text of a PDF's pages (a file or its bytes). A PDF that cannot be read is a
    ValueError naming why; one of more than `max_pages` pages too."""
    import io

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data) if isinstance(data, bytes) else data)
        if len(reader.pages) > max_pages:
            raise ValueError(f"the PDF has {len(reader.pages)} pages; at most {max_pages} "
                             "are read")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PyPdfError, KeyError, TypeError, AttributeError, IndexError, RecursionError,
            AssertionError, ZeroDivisionError) as exc:  # what pypdf raises on a broken file
        raise ValueError(f"not a readable PDF: {type(exc).__name__}: {exc}") from None


PUBLISH_TRIES = 5  # each a fresh read of the collection, when another ingest came first


def apply(store: DocumentStore, config: Config, collection: str, documents: dict[str, str], *,
          remove: Callable[[str], bool] = lambda source: False, dry_run: bool = False,
          progress: Progress | None = None) -> IngestReport:
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
                                [c for c in fresh if c.vector_id not in present], progress)
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


def _embed_and_store(store: DocumentStore, config: Config, collection: str,
                     chunks: list[Chunk], progress: Progress | None) -> dict[str, Chunk]:
    """Embed `chunks` and write their vectors; the chunks with their embedding
    metadata, by chunk id."""
    model = configured_embedder(config.rag)
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
        if progress is not None:
            progress(len(batch), len(chunks))
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
        for i, c in current.items() if i in ids], None)
    store.publish(collection, [embedded.get(i, c) for i, c in current.items()],
                  based_on=generation)
    return len(ids)


# -- users' own documents (the gateway's uploads) --------------------------------------
DOCUMENT_SUFFIXES = (".txt", ".md", ".markdown", ".pdf")
_NAME = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,200}$")


def document_text(name: str, data: bytes, *, max_bytes: int) -> str:
    """The text of an uploaded document, or DocumentRefused saying what is wrong. The
    kind is read from the bytes (a PDF's header) and must agree with the name."""
    if not _NAME.match(name) or name.startswith(".") or name != name.strip():
        raise DocumentRefused("the name must be 1-200 characters, with no slash, backslash "
                              "or control character, and not start with a dot or a space",
                              status=400)
    suffix = Path(name).suffix.lower()
    if suffix not in DOCUMENT_SUFFIXES:
        raise DocumentRefused(f"{name}: only {', '.join(DOCUMENT_SUFFIXES)} documents are "
                              "taken (text, Markdown, PDF)", status=415)
    if not data:
        raise DocumentRefused(f"{name}: the document is empty", status=400)
    if len(data) > max_bytes:
        raise DocumentRefused(f"{name}: {len(data)} bytes; the limit is {max_bytes}",
                              status=413)
    is_pdf = data[:1024].lstrip().startswith(b"%PDF-")
    if suffix == ".pdf":
        if not is_pdf:
            raise DocumentRefused(f"{name}: the bytes are not a PDF (no %PDF- header)",
                                  status=415)
        try:
            text = pdf_text(data)
        except ValueError as exc:
            raise DocumentRefused(f"{name}: {exc}", status=422) from None
        if len(text) > max_bytes:
            raise DocumentRefused(f"{name}: its text is {len(text)} characters; the limit "
                                  f"is {max_bytes}", status=413)
    else:
        if is_pdf:
            raise DocumentRefused(f"{name}: the bytes are a PDF; name it .pdf", status=415)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DocumentRefused(f"{name}: not UTF-8 text (byte {exc.start} is "
                                  f"{data[exc.start]:#04x})", status=415) from None
        if "\x00" in text:
            raise DocumentRefused(f"{name}: not text (it holds NUL bytes)", status=415)
    if not text.strip():
        raise DocumentRefused(f"{name}: no text could be read from it"
                              + (" (a scanned PDF has only images)" if suffix == ".pdf" else ""),
                              status=422)
    return text


class UserDocuments:
    """Each user's own documents, in their own collection (`user-{id}`, the first the
    retriever searches for them). Every call runs in a worker thread, ingestion one at
    a time: the event loop that calls never waits for a PDF, the model or a store."""

    def __init__(self, store: DocumentStore, config: Config) -> None:
        self._store = store
        self._config = config
        self._ingesting = trio.CapacityLimiter(1)

    def collection(self, user_id: str) -> str:
        return f"user-{user_id}"

    def close(self) -> None:
        self._store.close()

    async def list(self, user_id: str) -> list[dict[str, Any]]:
        chunks = await trio.to_thread.run_sync(self._store.chunks, self.collection(user_id),
                                               abandon_on_cancel=True)
        documents: dict[str, dict[str, Any]] = {}
        for chunk in chunks.values():
            entry = documents.setdefault(chunk.source, {"name": chunk.source, "chunks": 0,
                                                        "chars": 0, "embeddedAt": 0.0})
            entry["chunks"] += 1
            entry["chars"] += len(chunk.text)
            entry["embeddedAt"] = max(entry["embeddedAt"],
                                      float(chunk.metadata.get("embedded_at", 0)))
        for entry in documents.values():
            entry["embeddedAt"] = datetime.fromtimestamp(entry["embeddedAt"], UTC).isoformat()
        return sorted(documents.values(), key=lambda d: d["name"])

    async def put(self, user_id: str, name: str, data: bytes) -> tuple[bool, dict[str, Any]]:
        """Add or replace document `name`: whether it is new, and what changed."""
        rag = self._config.rag
        collection = self.collection(user_id)

        def put() -> tuple[bool, dict[str, Any]]:
            text = document_text(name, data, max_bytes=rag.max_document_bytes)
            sources = {c.source for c in self._store.chunks(collection).values()}
            if name not in sources and len(sources) >= rag.max_documents:
                raise DocumentRefused(f"you have {len(sources)} documents, the limit: delete "
                                      "one before adding another", status=409)
            report = apply(self._store, self._config, collection, {name: text})
            return name not in sources, {
                "name": name, "chunks": len(report.added) + len(report.changed)
                + report.unchanged, "added": len(report.added),
                "changed": len(report.changed), "unchanged": report.unchanged,
                "deleted": len(report.deleted)}

        return await trio.to_thread.run_sync(put, limiter=self._ingesting)

    async def delete(self, user_id: str, name: str) -> int:
        """Delete document `name`; how many chunks went (0: there was no such document)."""
        report = await trio.to_thread.run_sync(
            partial(apply, self._store, self._config, self.collection(user_id), {},
                    remove=lambda source: source == name), limiter=self._ingesting)
        return len(report.deleted)
