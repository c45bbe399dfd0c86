"""The document store: Chroma for vectors (embedded PersistentClient, or HttpClient when
`rag.chroma_url` is set) and a BM25 index per collection, persisted beside it.

Blocking: every method here runs in a worker thread. Embeddings are computed by
us (actors/adapters/embeddings.py) and handed to Chroma, which embeds nothing.
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np

if TYPE_CHECKING:
    import bm25s

from actors.errors import PermanentError, TransientError
from config import Rag, secret, stored_collection_name
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


def _bm25s() -> Any:
    import bm25s

    return bm25s


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
    """Chroma for vectors, bm25s for keywords. Both load on first use: a worker that
    never sees a RAG request never imports them (about a second of start-up)."""

    @classmethod
    def from_config(cls, rag: Rag) -> DocumentStore:
        return cls(path=Path(rag.path), chroma_url=rag.chroma_url or None,
                   timeout_s=rag.chroma_timeout_s, token_env=rag.chroma_token_env)

    def __init__(self, *, path: Path, chroma_url: str | None = None,
                 timeout_s: float = 10.0, token_env: str = "") -> None:
        self._path = path
        self.chroma_url = chroma_url
        self._token_env = token_env  # read when the server is first talked to
        self._timeout_s = timeout_s  # each request to a Chroma server
        self._bm25_dir = path / "bm25"
        if not chroma_url:
            path.mkdir(parents=True, exist_ok=True)  # an unwritable path fails at start
        self._chroma: Any = None
        self._bm25: dict[str, tuple[bm25s.BM25, list[str]]] = {}
        self._lock = threading.Lock()
        self._opening = threading.Lock()

    def close(self) -> None:
        """Close a Chroma server client's connections (the embedded store holds none)."""
        with self._opening:
            if self._chroma is not None and self.chroma_url:
                from actors.adapters.chroma_http import close

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
                    from actors.adapters.chroma_http import connect

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

    @_talks_to_chroma
    def exists(self, name: str) -> bool:
        try:
            self._collection(name)
        except PermanentError as exc:
            if exc.code not in ("no_collection", "bad_collection"):
                raise  # a refused token is not "no documents"
            return False
        return True

    # -- ingestion -------------------------------------------------------------------
    @_talks_to_chroma
    def chunks_of(self, name: str) -> dict[str, dict[str, Any]]:
        """Every chunk's metadata, by id."""
        if not self.exists(name):
            return {}
        got = self._collection(name).get(include=["metadatas"])
        return dict(zip(got["ids"], got["metadatas"], strict=True))

    @_talks_to_chroma
    def documents(self, name: str, ids: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        got = self._collection(name).get(ids=ids, include=["documents", "metadatas"])
        return {i: (d, m) for i, d, m in zip(got["ids"], got["documents"], got["metadatas"],
                                             strict=True)}

    @_talks_to_chroma
    def upsert(self, name: str, ids: list[str], texts: list[str], vectors: np.ndarray,
               metadatas: list[dict[str, Any]]) -> None:
        collection = self._collection(name, create=True)
        for start in range(0, len(ids), 1000):
            end = start + 1000
            collection.upsert(ids=ids[start:end], documents=texts[start:end],
                              embeddings=vectors[start:end].tolist(),
                              metadatas=metadatas[start:end])

    @_talks_to_chroma
    def delete(self, name: str, ids: list[str]) -> None:
        if ids:
            self._collection(name).delete(ids=ids)

    @_talks_to_chroma
    def rebuild_keyword_index(self, name: str) -> int:
        """Re-index the whole collection for BM25 (bm25s indexes are not incremental)."""
        got = self._collection(name, create=True).get(include=["documents"])
        folder = self._bm25_dir / collection_name(name)
        shutil.rmtree(folder, ignore_errors=True)
        with self._lock:
            self._bm25.pop(name, None)
        if not got["ids"]:
            return 0
        bm25s = _bm25s()
        index = bm25s.BM25()
        index.index(bm25s.tokenize(got["documents"], stopwords="en", show_progress=False),
                    show_progress=False)
        folder.mkdir(parents=True, exist_ok=True)
        index.save(str(folder))
        (folder / "ids.json").write_text(json.dumps(got["ids"]))
        return len(got["ids"])

    # -- retrieval ---------------------------------------------------------------------
    @_talks_to_chroma
    def vector_search(self, name: str, vector: np.ndarray, k: int,
                      where: dict[str, Any] | None) -> list[Hit]:
        collection = self._collection(name)
        found = collection.query(query_embeddings=[vector.tolist()], n_results=k, where=where,
                                 include=["documents", "metadatas", "distances"])
        return [Hit(id=i, text=d, source=str(m.get("source", "")), score=1.0 - dist, metadata=m,
                    collection=name)
                for i, d, m, dist in zip(found["ids"][0], found["documents"][0],
                                         found["metadatas"][0], found["distances"][0],
                                         strict=True)]

    def _keyword_index(self, name: str) -> tuple[bm25s.BM25, list[str]] | None:
        with self._lock:
            if name not in self._bm25:
                folder = self._bm25_dir / collection_name(name)
                if not (folder / "ids.json").exists():
                    return None
                self._bm25[name] = (_bm25s().BM25.load(str(folder)),
                                    json.loads((folder / "ids.json").read_text()))
            return self._bm25[name]

    @_talks_to_chroma
    def keyword_search(self, name: str, query: str, k: int,
                       where: dict[str, Any] | None) -> list[Hit]:
        loaded = self._keyword_index(name)
        if loaded is None:
            return []
        index, ids = loaded
        tokens = _bm25s().tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        if not tokens or not tokens[0]:
            return []
        # Ask for more when filtering: the filter runs after scoring.
        wanted = min(len(ids), k * 4 if where else k)
        positions, scores = index.retrieve(tokens, k=wanted, show_progress=False)
        picked = [(ids[p], float(s)) for p, s in zip(positions[0], scores[0], strict=True)
                  if s > 0]
        if not picked:
            return []
        got = self._collection(name).get(ids=[i for i, _ in picked], where=where,
                                         include=["documents", "metadatas"])
        by_id = {i: (d, m) for i, d, m in zip(got["ids"], got["documents"], got["metadatas"],
                                              strict=True)}
        return [Hit(id=i, text=by_id[i][0], source=str(by_id[i][1].get("source", "")),
                    score=s, metadata=by_id[i][1], collection=name)
                for i, s in picked if i in by_id][:k]

    @_talks_to_chroma
    def embeddings(self, name: str, ids: list[str]) -> dict[str, np.ndarray]:
        """The stored vectors of `ids` (reranking needs no second embedding call)."""
        got = self._collection(name).get(ids=ids, include=["embeddings"])
        return {i: np.asarray(v, dtype=np.float32)
                for i, v in zip(got["ids"], got["embeddings"], strict=True)}
