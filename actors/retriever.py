"""retriever: the actor that searches the users' collections for every job of a worker.

vector search (Chroma) + keyword search (BM25, shared in Postgres) -> reciprocal
rank fusion -> rerank. The reranker is semantic and lexical, with no model to
download: the exact cosine between the query and each fused candidate (from the
vectors stored at ingest, so no second embedding pass) plus a bonus for the share
of query terms the chunk contains.

One actor per worker owns the document store. Jobs put search orders in its
bounded mailbox (`Retriever.search`) and wait for the answer; the actor takes every
order waiting and serves them together in one worker thread: one embedding batch
for all their queries, one Chroma query per collection, one fetch of stored vectors
per collection. Each batch's blocking work runs while the next batch gathers, so
a burst costs a few batches, not one embedding and search per job on the event loop's
threads. A job that is cancelled stops waiting; an order nobody waits for any more is
dropped before its batch runs.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
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


@dataclass(eq=False)
class SearchOrder:
    """One job's search, in the retriever's mailbox; answered through `done`."""

    query: str
    names: list[str]
    top_k: int
    where: dict[str, Any] | None
    enqueued: float = field(default_factory=time.perf_counter)
    done: trio.Event = field(default_factory=trio.Event)
    result: Retrieved | None = None
    error: BaseException | None = None
    abandoned: bool = False  # the job stopped waiting: skip it

    @property
    def wanted(self) -> int:
        return self.top_k * CANDIDATES_PER_TOP_K


class Retriever:
    """The jobs' side of the retriever actor: checks what a user may search and puts
    the order in the actor's mailbox (waiting while it is full)."""

    def __init__(self, config: Config, mailbox: trio.MemorySendChannel[SearchOrder]) -> None:
        self._config = config
        self._mailbox = mailbox

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
        order = SearchOrder(query=query, names=self.collections_for(user_id, collection),
                            top_k=top_k, where=where)
        try:
            await self._mailbox.send(order)
            await order.done.wait()
        except BaseException:
            order.abandoned = True  # cancelled (the job's cancel or deadline): give up
            raise
        if order.error is not None:
            raise order.error.with_traceback(None)
        assert order.result is not None
        return order.result


async def run_retriever(inbox: trio.MemoryReceiveChannel[SearchOrder], store: DocumentIndex, *,
                        embedder: Callable[[], Embedder], batch_max: int = 64,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve search orders in batches until the mailbox closes or the actor is cancelled.
    `embedder` loads the embedding model on the first batch, so a worker that never
    sees a RAG request never loads it."""
    task_status.started()
    async for first in inbox:
        orders = [first]
        while len(orders) < batch_max:
            try:
                orders.append(inbox.receive_nowait())
            except trio.WouldBlock:
                break
        live = [o for o in orders if not o.abandoned]
        if live:
            await Batch(store, embedder, live).serve()
        for order in live:
            order.done.set()


@asynccontextmanager
async def retriever_running(store: DocumentIndex, config: Config, *,
                            embedder: Callable[[], Embedder],
                            mailbox: int = 128) -> AsyncGenerator[Retriever]:
    """A retriever actor for the duration of the block (the CLI, benchmarks, tests;
    the supervisor starts its own)."""
    send, receive = trio.open_memory_channel[SearchOrder](mailbox)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_retriever, receive, store, embedder=embedder))
        yield Retriever(config, send)
        nursery.cancel_scope.cancel()


class Batch:
    """The orders one turn of the actor serves together. Each step is blocking and runs
    in a worker thread (abandoned on cancel, at shutdown); the keyword searches (Postgres)
    run while the queries are embedded and searched in Chroma. A step that fails fails
    only the orders it was for."""

    def __init__(self, store: DocumentIndex, embedder: Callable[[], Embedder],
                 orders: list[SearchOrder]) -> None:
        self.store, self.embedder, self.orders = store, embedder, orders
        self.failed: dict[int, BaseException] = {}
        self.present: dict[str, bool] = {}
        self.vectors: list[np.ndarray[Any, Any]] = []
        self.by_vector: list[list[Hit]] = [[] for _ in orders]
        self.by_keyword: list[list[Hit]] = [[] for _ in orders]
        # (collection, vector id) -> cosine with order i's query, known from Chroma's own
        # distances for vector hits; fetched for keyword-only ones.
        self.cosines: list[dict[tuple[str, str], float]] = [{} for _ in orders]

    async def serve(self) -> None:
        await self._step(self.check)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._step, self.vector_searches)
            nursery.start_soon(self._step, self.keyword_searches)
        await self._step(self.rerank)

    async def _step(self, step: Callable[[], None]) -> None:
        await trio.to_thread.run_sync(step, abandon_on_cancel=True)

    def _guard(self, indexes: Iterable[int], step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:
            for i in indexes:
                self.failed.setdefault(i, exc)

    def _searching(self, name: str) -> list[int]:
        return [i for i, o in enumerate(self.orders) if name in o.names and i not in self.failed
                and self.present.get(name)]

    def check(self) -> None:
        """Which collections exist, once per batch."""
        for name in dict.fromkeys(n for o in self.orders for n in o.names):
            def exists(name: str = name) -> None:
                self.present[name] = self.store.exists(name)
            self._guard([i for i, o in enumerate(self.orders) if name in o.names], exists)

    def vector_searches(self) -> None:
        """One embedding call for every query; one Chroma query per collection and filter."""
        orders = self.orders

        def embed() -> None:
            self.vectors[:] = list(self.embedder().embed([o.query for o in orders]))
        self._guard(range(len(orders)), embed)
        groups: dict[tuple[str, str], list[int]] = {}
        for name in self.present:
            for i in self._searching(name):
                groups.setdefault((name, json.dumps(orders[i].where, sort_keys=True)),
                                  []).append(i)
        for (name, _), members in groups.items():
            def search(name: str = name, members: list[int] = members) -> None:
                found = self.store.vector_search_many(
                    name, [self.vectors[i] for i in members],
                    max(orders[i].wanted for i in members), orders[members[0]].where)
                for i, hits in zip(members, found, strict=True):
                    self.by_vector[i] += hits[:orders[i].wanted]
                    self.cosines[i].update({(name, h.metadata["vector_id"]): h.score
                                            for h in hits})
            self._guard(members, search)

    def keyword_searches(self) -> None:
        for name in self.present:
            for i in self._searching(name):
                order = self.orders[i]

                def search(i: int = i, name: str = name, order: SearchOrder = order) -> None:
                    self.by_keyword[i] += self.store.keyword_search(name, order.query,
                                                                    order.wanted, order.where)
                self._guard([i], search)

    def rerank(self) -> None:
        """Fuse each order's two lists, score the candidates (cosine with the query plus
        word coverage), and answer every order, with its result or its error."""
        orders = self.orders
        fused: list[list[Hit]] = []
        missing: dict[str, set[str]] = {}  # collection -> vector ids to fetch
        for i, order in enumerate(orders):
            self.by_vector[i].sort(key=lambda h: -h.score)
            self.by_keyword[i].sort(key=lambda h: -h.score)
            fused.append(fuse([self.by_vector[i][:order.wanted],
                               self.by_keyword[i][:order.wanted]], order.wanted))
            if i not in self.failed:
                for h in fused[i]:
                    if (h.collection, h.metadata["vector_id"]) not in self.cosines[i]:
                        missing.setdefault(h.collection, set()).add(h.metadata["vector_id"])
        stored: dict[tuple[str, str], np.ndarray[Any, Any]] = {}
        for name, ids in missing.items():
            def fetch(name: str = name, ids: set[str] = ids) -> None:
                stored.update({(name, v): e
                               for v, e in self.store.embeddings(name, sorted(ids)).items()})
            self._guard([i for i, hits in enumerate(fused)
                         if any(h.collection == name for h in hits)], fetch)
        now = time.perf_counter()
        for i, order in enumerate(orders):
            if i in self.failed:
                order.error = self.failed[i]
                continue
            for h in fused[i]:
                key = (h.collection, h.metadata["vector_id"])
                if key not in self.cosines[i] and key in stored:
                    self.cosines[i][key] = float(stored[key] @ self.vectors[i])
            scored = [Hit(id=h.id, text=h.text, source=h.source, metadata=h.metadata,
                          collection=h.collection,
                          score=SEMANTIC_WEIGHT * self.cosines[i][key]
                          + (1 - SEMANTIC_WEIGHT) * coverage(order.query, h.text))
                      for h in fused[i]
                      if (key := (h.collection, h.metadata["vector_id"])) in self.cosines[i]]
            reranked = sorted(scored, key=lambda h: -h.score)[:order.top_k]
            order.result = Retrieved(
                steps=[RetrievalStep("vector", order.query, self.by_vector[i][:order.top_k]),
                       RetrievalStep("keyword", order.query, self.by_keyword[i][:order.top_k]),
                       RetrievalStep("rerank", order.query, reranked)],
                elapsed_ms=round((now - order.enqueued) * 1000))
