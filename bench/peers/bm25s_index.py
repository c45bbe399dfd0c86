"""The keyword index chat-actors had before the shared one: bm25s over a collection's
chunks, held by each worker (it was saved on the worker's disk and cached per
process). Kept here to compare quality and latency with the BM25 in Postgres."""

from __future__ import annotations

from actors.adapters.rag.keywords import Chunk
from messages.ports import Hit


class Bm25sIndex:
    def __init__(self, chunks: dict[str, Chunk]) -> None:
        import bm25s

        self._bm25s = bm25s
        self._chunks = list(chunks.values())
        self._index = bm25s.BM25()
        self._index.index(bm25s.tokenize([c.text for c in self._chunks], stopwords="en",
                                         show_progress=False), show_progress=False)

    def search(self, collection: str, query: str, k: int) -> list[Hit]:
        tokens = self._bm25s.tokenize([query], stopwords="en", return_ids=False,
                                      show_progress=False)
        if not tokens or not tokens[0]:
            return []
        positions, scores = self._index.retrieve(tokens, k=min(k, len(self._chunks)),
                                                 show_progress=False)
        return [Hit(id=self._chunks[p].chunk_id, text=self._chunks[p].text,
                    source=self._chunks[p].source, score=float(s), metadata={},
                    collection=collection)
                for p, s in zip(positions[0], scores[0], strict=True) if s > 0]
