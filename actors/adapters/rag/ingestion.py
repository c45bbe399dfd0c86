"""Ingestion: documents -> chunks -> embeddings -> the document store, in one step.

The one path of `chat-actors ingest` and of the gateway's uploads. Re-ingesting is
incremental: a chunk whose text is unchanged is kept (its embedding too), a changed
one is replaced, and chunks of vanished text are deleted. Chunks embedded with
another model, or longer ago than rag.max_age_days, are stale: `freshness` lists
them and `refresh` embeds them again. Blocking: run it in a worker thread.

Every chunk records its document's origin (`origin` in its metadata): `ingest` for
the CLI, `upload` for the gateway. A CLI run never changes or deletes an upload.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from actors.adapters.llm.tokens import TokenCounter
from actors.adapters.rag.documents import DocumentStore
from actors.adapters.rag.embeddings import configured_embedder
from actors.adapters.rag.keywords import Chunk, Superseded
from actors.chunking import chunk_text
from actors.errors import PermanentError
from config import OWN_COLLECTION, Config

Origin = Literal["ingest", "upload"]
INGEST: Origin = "ingest"  # put there by `chat-actors ingest`
UPLOAD: Origin = "upload"  # uploaded through the gateway (PUT /v1/documents/<name>)
Progress = Callable[[int, int], None]  # (chunks just embedded, chunks to embed)


@dataclass
class IngestReport:
    files: int = 0
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    kept_uploads: list[str] = field(default_factory=list)  # named for removal, not removed

    def summary(self) -> str:
        return (f"{self.files} files: {len(self.added)} chunks added, {len(self.changed)} changed, "
                f"{self.unchanged} unchanged, {len(self.deleted)} deleted"
                + (f"; skipped {', '.join(self.skipped_files)}" if self.skipped_files else "")
                + (f"; kept {len(self.kept_uploads)} uploaded documents "
                   f"({', '.join(self.kept_uploads)})" if self.kept_uploads else ""))


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


PUBLISH_TRIES = 5  # each a fresh read of the collection, when another ingest came first


class UploadConflict(PermanentError):
    """A CLI ingest of documents named like documents uploaded through the gateway:
    refused, nothing written (the CLI never changes an upload)."""

    def __init__(self, collection: str, names: list[str]) -> None:
        super().__init__(f"{collection}: {', '.join(map(repr, names))} were uploaded through "
                         "the gateway; `chat-actors ingest` never replaces an upload",
                         code="ingest")
        self.collection = collection
        self.names = names


def apply(store: DocumentStore, config: Config, collection: str, documents: dict[str, str], *,
          origin: Origin = INGEST, remove: Callable[[str], bool] = lambda source: False,
          dry_run: bool = False, progress: Progress | None = None) -> IngestReport:
    """Make the collection hold `documents` (source -> text, from `origin`) in place of
    those sources' earlier text, without the other sources `remove` names, and every
    other source as it was: the one path of the CLI and the gateway's uploads. A CLI
    write (INGEST) never touches an upload: one naming an uploaded document is
    UploadConflict, and `remove` passes over them (`kept_uploads`). Embeds only the
    text it has no vector for, then publishes the whole collection in one step; when
    another ingest published first, it reads the collection again and retries (its
    vectors are kept, so nothing is embedded twice)."""
    wanted = _chunked(config, documents, origin)
    for attempt in range(PUBLISH_TRIES):
        generation, current = store.snapshot(collection)
        report, chunks = _plan(collection, current, dict(wanted), documents, remove, origin)
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


def _chunked(config: Config, documents: dict[str, str], origin: Origin) -> dict[str, Chunk]:
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
                                         "content_hash": digest, "origin": origin})
    return wanted


def _plan(collection: str, current: dict[str, Chunk], wanted: dict[str, Chunk],
          documents: dict[str, str], remove: Callable[[str], bool], origin: Origin
          ) -> tuple[IngestReport, list[Chunk]]:
    """What changes, and the collection's chunks after it."""
    if origin == INGEST:
        taken = sorted({c.source for c in current.values()
                        if c.source in documents and c.metadata.get("origin") == UPLOAD})
        if taken:
            raise UploadConflict(collection, taken)
    report = IngestReport(files=len(documents))
    for chunk_id, chunk in wanted.items():
        old = current.get(chunk_id)
        if old is None:
            report.added.append(chunk_id)
        elif old.metadata.get("content_hash") != chunk.metadata["content_hash"]:
            report.changed.append(chunk_id)
        else:
            report.unchanged += 1
            # Its vector and embedding metadata stay; its origin is this write's.
            wanted[chunk_id] = old if old.metadata.get("origin") == origin else replace(
                old, metadata={**old.metadata, "origin": origin})
    # Chunks of the sources given that are gone (the text shrank), or of removed sources.
    named = {i for i, c in current.items()
             if i not in wanted and c.source not in documents and remove(c.source)}
    uploaded = {i for i in named
                if origin == INGEST and _maybe_uploaded(collection, current[i])}
    report.kept_uploads = sorted({current[i].source for i in uploaded})
    report.deleted = [i for i, c in current.items() if i not in wanted and (
        c.source in documents or (i in named and i not in uploaded))]
    gone = set(report.deleted)
    kept = [c for i, c in current.items() if i not in wanted and i not in gone]
    return report, [*kept, *wanted.values()]


def _maybe_uploaded(collection: str, chunk: Chunk) -> bool:
    """Whether `chunk`'s document was, or may have been, uploaded through the gateway.
    Chunks written before documents had an origin carry none: an unmarked document is a
    CLI one, except in a user's collection under a name that is no path (what an upload
    is named), which the CLI keeps rather than guess (the user can delete it)."""
    marked = chunk.metadata.get("origin")
    if marked is not None:
        return marked == UPLOAD
    return collection.startswith(OWN_COLLECTION) and "/" not in chunk.source


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
