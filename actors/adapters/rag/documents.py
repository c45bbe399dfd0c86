"""The document store: Chroma for vectors (embedded PersistentClient, or HttpClient when
`rag.chroma_url` is set) and the keyword index and chunk texts in Postgres, which every
worker shares (actors/adapters/rag/keywords.py).

A collection is what its current generation in Postgres says it is. Vectors are
addressed by their text (`vector_id`: chunk id and content hash), so an ingest writes
the vectors it lacks beside the ones in use, publishes the new generation in one
transaction, and only then drops the vectors no chunk uses: a search never sees half
an ingest, and every hit it returns comes from one generation.

Blocking: every method here runs in a worker thread. Embeddings are computed by
us (actors/adapters/rag/embeddings.py) and handed to Chroma, which embeds nothing.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import numpy as np

from actors.adapters.postgres import Postgres
from actors.adapters.rag.keywords import Chunk, KeywordIndex
from actors.errors import PermanentError, TransientError
from config import Config, secret, stored_collection_name
from messages.ports import Hit

P = ParamSpec("P")
R = TypeVar("R")

def collection_name(name: str) -> str:
    """The stored name of collection `name` (config.collection_name), or a
    PermanentError for a name no collection can have."""
    try:
        return stored_collection_name(name)
    except ValueError as exc:
        raise PermanentError(str(exc), code="bad_collection") from None


def _chroma_errors() -> Any:
    from chromadb import errors

    return errors


def _away(exc: BaseException) -> str | None:
    """Why a Chroma server could not be talked to, or None when `exc` is something else."""
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    if isinstance(exc, (httpx.TransportError, ConnectionError, OSError)):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ValueError) and "could not connect" in str(exc).lower():
        return str(exc)  # chromadb's word for a refused connection
    return None


def _talks_to_chroma(method: Callable[P, R]) -> Callable[P, R]:
    """A Chroma server that is away (refused, reset, silent past the timeout) is a
    TransientError naming its address, whichever call met it."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (TransientError, PermanentError):
            raise
        except Exception as exc:
            store = args[0]
            assert isinstance(store, DocumentStore)
            errors = _chroma_errors()
            if isinstance(exc, errors.AuthorizationError | errors.ChromaAuthError):
                raise PermanentError(f"chroma at {store.where}: the token was refused "
                                     f"({exc}): check rag.chroma_token_env",
                                     code="chroma_auth") from exc
            away = _away(exc)
            if away is None:
                raise
            raise TransientError(f"chroma at {store.where}: {away}") from exc

    return call


class DocumentStore:
    """Chroma for vectors, Postgres for keywords and texts. Chroma loads on first use:
    a worker that never sees a RAG request never imports it (about a second)."""

    @classmethod
    def from_config(cls, config: Config, pg: Postgres | None = None) -> DocumentStore:
        """The store `config.rag` describes, on `pg` (a pool of its own when None)."""
        rag = config.rag
        own = None if pg else Postgres.of(config.postgres, pool_size=2)
        store = cls(path=Path(rag.path), keywords=KeywordIndex(pg or cast(Postgres, own)),
                    chroma_url=rag.chroma_url or None, timeout_s=rag.chroma_timeout_s,
                    token_env=rag.chroma_token_env)
        store._own_pg = own  # closed with the store
        return store

    def __init__(self, *, path: Path, keywords: KeywordIndex, chroma_url: str | None = None,
                 timeout_s: float = 10.0, token_env: str = "") -> None:
        self._path = path
        self.keywords = keywords
        self.chroma_url = chroma_url
        self._token_env = token_env  # read when the server is first talked to
        self._timeout_s = timeout_s  # each request to a Chroma server
        if not chroma_url:
            path.mkdir(parents=True, exist_ok=True)  # an unwritable path fails at start
        self._chroma: Any = None
        self._opening = threading.Lock()
        self._own_pg: Postgres | None = None

    def close(self) -> None:
        """Close a Chroma server client's connections (the embedded store holds none),
        and the store's own Postgres connections."""
        if self._own_pg is not None:
            self._own_pg.close()
        with self._opening:
            if self._chroma is not None and self.chroma_url:
                from actors.adapters.rag.chroma_http import close

                close(self._chroma)
                self._chroma = None

    @property
    def where(self) -> str:
        """The Chroma server's address, or the embedded store's folder."""
        return self.chroma_url or str(self._path / "chroma")

    @property
    def _client(self) -> Any:
        with self._opening:
            if self._chroma is None:
                if self.chroma_url:
                    from actors.adapters.rag.chroma_http import connect

                    self._chroma = connect(self.chroma_url, self._timeout_s,
                                           secret(self._token_env))
                else:
                    import chromadb
                    from chromadb.config import Settings

                    self._chroma = chromadb.PersistentClient(
                        path=str(self._path / "chroma"),
                        settings=Settings(anonymized_telemetry=False))
            return self._chroma

    def _collection(self, name: str, create: bool = False) -> Any:
        name = collection_name(name)
        try:
            if create:
                return self._client.get_or_create_collection(
                    name, metadata={"hnsw:space": "cosine"}, embedding_function=None)
            return self._client.get_collection(name, embedding_function=None)
        except (ValueError, _chroma_errors().NotFoundError) as exc:
            if _away(exc) is not None:
                raise
            raise PermanentError(f"no collection {name!r}", code="no_collection") from exc

    def _has_vectors(self, name: str) -> bool:
        try:
            return bool(self._collection(name).count())
        except PermanentError as exc:
            if exc.code not in ("no_collection", "bad_collection"):
                raise  # a refused token is not "no documents"
            return False

    @_talks_to_chroma
    def exists(self, name: str) -> bool:
        """Whether the collection has been published. Vectors with no keyword index were
        ingested by a version that kept it on the worker's disk: a clear error, not an
        empty result."""
        if self.keywords.generation(collection_name(name)) is not None:
            return True
        if self._has_vectors(name):
            raise PermanentError(
                f"collection {name!r} was ingested by an earlier version of chat-actors "
                "(its keyword index is not in Postgres): run `chat-actors ingest` for it again",
                code="reingest")
        return False

    # -- ingestion -------------------------------------------------------------------
    def chunks(self, name: str) -> dict[str, Chunk]:
        """The current generation's chunks, by chunk id."""
        return self.keywords.current(collection_name(name))[1]

    def snapshot(self, name: str) -> tuple[int | None, dict[str, Chunk]]:
        """The current generation (None: never published) and its chunks."""
        return self.keywords.current(collection_name(name))

    def chunks_of(self, name: str) -> dict[str, dict[str, Any]]:
        """Every current chunk's metadata, by chunk id."""
        return {i: c.metadata for i, c in self.chunks(name).items()}

    @_talks_to_chroma
    def vectors_present(self, name: str, vector_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The metadata of those of `vector_ids` Chroma holds, by vector id (an
        interrupted ingest's vectors are used, not embedded again)."""
        if not vector_ids or not self._has_vectors(name):
            return {}
        got = self._collection(name).get(ids=vector_ids, include=["metadatas"])
        return dict(zip(got["ids"], got["metadatas"], strict=True))

    @_talks_to_chroma
    def upsert(self, name: str, vector_ids: list[str], texts: list[str], vectors: np.ndarray,
               metadatas: list[dict[str, Any]]) -> None:
        collection = self._collection(name, create=True)
        for start in range(0, len(vector_ids), 1000):
            end = start + 1000
            collection.upsert(ids=vector_ids[start:end], documents=texts[start:end],
                              embeddings=vectors[start:end].tolist(),
                              metadatas=metadatas[start:end])

    @_talks_to_chroma
    def publish(self, name: str, chunks: Iterable[Chunk], *, based_on: int | None,
                replaced: Iterable[Chunk] = ()) -> int:
        """Make `chunks` the collection, for every worker at once, if it is still at
        generation `based_on` (else Superseded), then drop the vectors of `replaced`
        (that generation's chunks) that no chunk uses any more. Vectors of another
        ingest still in progress are never in `replaced`, so they stay."""
        chunks = list(chunks)
        generation = self.keywords.publish(collection_name(name), chunks, based_on=based_on)
        used = {c.vector_id for c in chunks}
        unused = sorted({c.vector_id for c in replaced} - used)
        if unused and self._has_vectors(name):
            collection = self._collection(name)
            for start in range(0, len(unused), 1000):
                collection.delete(ids=unused[start:start + 1000])
        return generation

    # -- retrieval ---------------------------------------------------------------------
    @staticmethod
    def _hit(name: str, chunk: Chunk, score: float) -> Hit:
        return Hit(id=chunk.chunk_id, text=chunk.text, source=chunk.source, score=score,
                   metadata={**chunk.metadata, "vector_id": chunk.vector_id}, collection=name)

    @_talks_to_chroma
    def vector_search_many(self, name: str, vectors: list[np.ndarray], k: int,
                           where: dict[str, Any] | None) -> list[list[Hit]]:
        """One Chroma query for several query vectors; hits from the current generation."""
        if not vectors:
            return []
        # A few more than k: vectors an ingest in progress wrote are not searchable yet.
        found = self._collection(name).query(
            query_embeddings=[v.tolist() for v in vectors], n_results=k + k // 2 + 2,
            where=where, include=["distances"])
        chunks = self.keywords.resolve(collection_name(name),
                                       sorted({i for ids in found["ids"] for i in ids}))
        return [[self._hit(name, chunks[i], 1.0 - dist)
                 for i, dist in zip(ids, distances, strict=True) if i in chunks][:k]
                for ids, distances in zip(found["ids"], found["distances"], strict=True)]

    @_talks_to_chroma
    def keyword_search(self, name: str, query: str, k: int,
                       where: dict[str, Any] | None) -> list[Hit]:
        # Ask for more when filtering: the filter runs after scoring.
        found = self.keywords.search(collection_name(name), query, k * 4 if where else k)
        if where and found:
            allowed = set(self._collection(name).get(ids=[c.vector_id for c, _ in found],
                                                     where=where, include=[])["ids"])
            found = [(c, s) for c, s in found if c.vector_id in allowed]
        return [self._hit(name, c, s) for c, s in found[:k]]

    @_talks_to_chroma
    def embeddings(self, name: str, vector_ids: list[str]) -> dict[str, np.ndarray]:
        """The stored vectors of `vector_ids` (reranking needs no second embedding call)."""
        got = self._collection(name).get(ids=vector_ids, include=["embeddings"])
        return {i: np.asarray(v, dtype=np.float32)
                for i, v in zip(got["ids"], got["embeddings"], strict=True)}
