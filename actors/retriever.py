"""retriever: hybrid search over the user's collections, for one job.

vector search (Chroma) + keyword search (BM25) -> reciprocal rank fusion ->
rerank. The reranker is semantic and lexical, with no model to download: the
exact cosine between the query and each fused candidate (from the vectors
stored at ingest, so no second embedding pass) plus a bonus for the share of
query terms the chunk contains.
Runs inside the job's nursery: it is cancelled with the job, and its blocking
calls run in worker threads that a cancel abandons.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import trio

from actors.errors import PermanentError
from actors.ports import DocumentIndex, Embedder
from config import Config, stored_collection_name
from messages.ports import Hit

RRF_K = 60  # the usual constant of reciprocal rank fusion
CANDIDATES_PER_TOP_K = 4
SEMANTIC_WEIGHT = 0.8
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class RetrievalStep:
    step: str  # "vector", "keyword", "rerank"
    query: str
    hits: list[Hit]


@dataclass(frozen=True)
class Retrieved:
    steps: list[RetrievalStep]
    elapsed_ms: int

    @property
    def hits(self) -> list[Hit]:
        return self.steps[-1].hits if self.steps else []


class Retrieval(Protocol):
    async def search(self, *, query: str, user_id: str, collection: str | None, top_k: int,
                     where: dict[str, Any] | None) -> Retrieved: ...


def fuse(rankings: list[list[Hit]], limit: int) -> list[Hit]:
    """Reciprocal rank fusion: each list votes 1 / (RRF_K + rank) for its hits."""
    scores: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.id] = scores.get(hit.id, 0.0) + 1.0 / (RRF_K + rank)
            first.setdefault(hit.id, hit)
    ordered = sorted(scores, key=lambda i: -scores[i])[:limit]
    return [Hit(id=i, text=first[i].text, source=first[i].source, score=scores[i],
                metadata=first[i].metadata, collection=first[i].collection) for i in ordered]


def coverage(query: str, text: str) -> float:
    terms = set(_WORD.findall(query.lower()))
    return len(terms & set(_WORD.findall(text.lower()))) / len(terms) if terms else 0.0


class Retriever:
    """`embedder` loads the embedding model; it is called on the first search, in a
    thread, so a worker that never sees a RAG request never loads it."""

    def __init__(self, store: DocumentIndex, config: Config, *,
                 embedder: Callable[[], Embedder], threads: int = 2) -> None:
        self._store = store
        self._config = config
        self._embedder = embedder
        self._limiter = trio.CapacityLimiter(threads)

    def collections_for(self, user_id: str, requested: str | None) -> list[str]:
        allowed = self._config.rag.allowed(user_id)
        if requested is not None:
            # On the stored names: what is searched is exactly what is permitted.
            if stored_collection_name(requested) not in {stored_collection_name(n) for n in allowed}:
                raise PermanentError(f"collection {requested!r} is not open to user {user_id}",
                                     code="forbidden")
            return [requested]
        return allowed

    async def search(self, *, query: str, user_id: str, collection: str | None, top_k: int,
                     where: dict[str, Any] | None) -> Retrieved:
        names = self.collections_for(user_id, collection)
        wanted = top_k * CANDIDATES_PER_TOP_K
        started = time.perf_counter()

        def candidates() -> tuple[np.ndarray[Any, Any], list[Hit], list[Hit]]:
            present = [n for n in names if self._store.exists(n)]
            vector = self._embedder().embed([query])[0]
            by_vector = [h for n in present for h in self._store.vector_search(n, vector,
                                                                               wanted, where)]
            by_keyword = [h for n in present
                          for h in self._store.keyword_search(n, query, wanted, where)]
            by_vector.sort(key=lambda h: -h.score)
            by_keyword.sort(key=lambda h: -h.score)
            return vector, by_vector[:wanted], by_keyword[:wanted]

        query_vector, by_vector, by_keyword = await trio.to_thread.run_sync(
            candidates, limiter=self._limiter, abandon_on_cancel=True)
        fused = fuse([by_vector, by_keyword], wanted)

        def rerank() -> list[Hit]:
            if not fused:
                return []
            stored: dict[str, np.ndarray[Any, Any]] = {}
            for name in {h.collection for h in fused}:
                stored |= self._store.embeddings(name, [h.id for h in fused
                                                        if h.collection == name])
            scored = [Hit(id=h.id, text=h.text, source=h.source, metadata=h.metadata,
                          collection=h.collection,
                          score=float(SEMANTIC_WEIGHT * float(stored[h.id] @ query_vector)
                                      + (1 - SEMANTIC_WEIGHT) * coverage(query, h.text)))
                      for h in fused if h.id in stored]
            return sorted(scored, key=lambda h: -h.score)[:top_k]

        reranked = await trio.to_thread.run_sync(rerank, limiter=self._limiter,
                                                 abandon_on_cancel=True)
        return Retrieved(steps=[RetrievalStep("vector", query, by_vector[:top_k]),
                                RetrievalStep("keyword", query, by_keyword[:top_k]),
                                RetrievalStep("rerank", query, reranked)],
                         elapsed_ms=round((time.perf_counter() - started) * 1000))
