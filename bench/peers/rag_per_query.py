"""The retriever chat-actors had before the actor: each job searched on its own, in
worker threads (two at a time), embedding its one query alone. The same store and
the same fusion and rerank as the actor, so a burst measures only the difference
between one search per job and batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import trio

from actors.adapters.rag.documents import DocumentStore
from actors.ports import Embedder
from actors.retriever import CANDIDATES_PER_TOP_K, SEMANTIC_WEIGHT, coverage, fuse
from messages.ports import Hit


class PerQueryRetriever:
    def __init__(self, store: DocumentStore, embedder: Callable[[], Embedder],
                 threads: int = 2) -> None:
        self._store = store
        self._embedder = embedder
        self._limiter = trio.CapacityLimiter(threads)

    async def search(self, query: str, names: list[str], top_k: int) -> list[Hit]:
        wanted = top_k * CANDIDATES_PER_TOP_K

        def candidates() -> tuple[np.ndarray[Any, Any], list[Hit], list[Hit]]:
            present = [n for n in names if self._store.exists(n)]
            vector = self._embedder().embed([query])[0]
            by_vector = [h for n in present
                         for h in self._store.vector_search_many(n, [vector], wanted, None)[0]]
            by_keyword = [h for n in present
                          for h in self._store.keyword_search(n, query, wanted, None)]
            return vector, by_vector, by_keyword

        vector, by_vector, by_keyword = await trio.to_thread.run_sync(
            candidates, limiter=self._limiter)
        fused = fuse([by_vector, by_keyword], wanted)

        def rerank() -> list[Hit]:
            stored: dict[str, np.ndarray[Any, Any]] = {}
            for name in {h.collection for h in fused}:
                stored |= self._store.embeddings(name, [h.metadata["vector_id"] for h in fused
                                                        if h.collection == name])
            scored = [(SEMANTIC_WEIGHT * float(stored[h.metadata["vector_id"]] @ vector)
                       + (1 - SEMANTIC_WEIGHT) * coverage(query, h.text), h) for h in fused
                      if h.metadata["vector_id"] in stored]
            return [h for _, h in sorted(scored, key=lambda p: -p[0])][:top_k]

        return await trio.to_thread.run_sync(rerank, limiter=self._limiter)
