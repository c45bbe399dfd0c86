"""The retriever actor: batched searches, cancels that abandon, failures kept to their own
searches, a bounded mailbox. On fakes of our own ports (tests/fakes.py); the real
document store is tested in tests/test_rag.py."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

import pytest
import trio
import trio.testing

from actors.errors import TransientError
from actors.retriever import Retrieved, SearchOrder, retriever_running
from config import load_config
from tests.fakes import FakeDocuments, FakeEmbedder

DOCS = ["Tansu is a Kafka broker", "Redis stream entries", "Postgres fsync per group commit",
        "Chroma holds the vectors"]
CONFIG = load_config(environ={"CHAT_ACTORS__RAG__SHARED_COLLECTIONS": '["docs"]'})


def documents(gate: threading.Event | None = None, **collections: list[str]) -> FakeDocuments:
    return FakeDocuments(collections={"docs": DOCS, **collections},
                         embedder=FakeEmbedder(gate))


def running(docs: FakeDocuments, mailbox: int = 128):
    embedder = docs.embedder
    return retriever_running(docs, CONFIG, embedder=lambda: embedder, mailbox=mailbox)


async def entered(embedder: FakeEmbedder) -> None:
    """Until the first batch is inside the embedder."""
    await trio.to_thread.run_sync(partial(embedder.entered.wait, 30))


async def test_concurrent_searches_share_one_embedding_batch_and_one_query_per_collection():
    gate = threading.Event()
    docs = documents(gate)
    queries = ["tansu broker", "redis stream", "postgres fsync", "chroma vectors"] * 5
    results: dict[int, Retrieved] = {}
    async with running(docs) as retriever, trio.open_nursery() as nursery:
        async def search(n: int) -> None:
            results[n] = await retriever.search(query=queries[n], user_id="u", collection=None,
                                                top_k=2, where=None)

        nursery.start_soon(search, 0)
        await entered(docs.embedder)  # the first search is being served alone
        for n in range(1, len(queries)):
            nursery.start_soon(search, n)
        await trio.testing.wait_all_tasks_blocked()  # the other 19 wait in the mailbox
        gate.set()
    assert [len(b) for b in docs.embedder.batches] == [1, 19]
    # One query of the collection per batch, each with all the batch's vectors; the
    # user's own collection does not exist and is never queried.
    assert docs.vector_queries == [("docs", 1), ("docs", 19)]
    for n, query in enumerate(queries):
        word = query.split()[0]
        assert word in results[n].hits[0].text.lower(), (query, results[n].hits)
        assert [s.step for s in results[n].steps] == ["vector", "keyword", "rerank"]


async def test_a_cancelled_search_is_dropped_before_its_batch_and_the_others_answered():
    gate = threading.Event()
    docs = documents(gate)
    answered: list[str] = []
    async with running(docs) as retriever, trio.open_nursery() as nursery:
        async def search(query: str, scope: trio.CancelScope | None = None) -> None:
            with scope or trio.CancelScope():
                await retriever.search(query=query, user_id="u", collection=None, top_k=1,
                                       where=None)
                answered.append(query)

        nursery.start_soon(search, "tansu first")
        await entered(docs.embedder)
        cancelled = trio.CancelScope()
        nursery.start_soon(search, "redis cancelled", cancelled)
        nursery.start_soon(search, "postgres kept")
        await trio.testing.wait_all_tasks_blocked()
        cancelled.cancel()  # the job's cancel: its search gives up at once...
        await trio.testing.wait_all_tasks_blocked()
        assert answered == [] and not gate.is_set()
        gate.set()
    # ...and is never embedded or searched; the rest are answered.
    assert docs.embedder.batches == [["tansu first"], ["postgres kept"]]
    assert sorted(answered) == ["postgres kept", "tansu first"]


async def test_a_cancel_while_the_batch_runs_returns_at_once():
    gate = threading.Event()
    docs = documents(gate)
    async with running(docs) as retriever:
        with trio.move_on_after(0.05) as waited:
            await retriever.search(query="tansu", user_id="u", collection=None, top_k=1,
                                   where=None)
        assert waited.cancelled_caught and not gate.is_set()  # the batch is still inside
        gate.set()
        # The actor goes on serving.
        found = await retriever.search(query="redis", user_id="u", collection=None, top_k=1,
                                       where=None)
    assert "Redis" in found.hits[0].text


async def test_one_collections_failure_fails_only_the_searches_that_read_it():
    gate = threading.Event()
    docs = documents(gate, **{"user-bob": ["Bob's Kafka notes"]})
    docs.broken.add("user-bob")
    outcome: dict[str, object] = {}
    async with running(docs) as retriever, trio.open_nursery() as nursery:
        async def search(user: str) -> None:
            try:
                outcome[user] = await retriever.search(query="kafka", user_id=user,
                                                       collection=None, top_k=2, where=None)
            except TransientError as exc:
                outcome[user] = exc

        nursery.start_soon(search, "first")
        await entered(docs.embedder)
        nursery.start_soon(search, "bob")
        nursery.start_soon(search, "alice")
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert isinstance(outcome["bob"], TransientError) and "user-bob" in str(outcome["bob"])
    assert isinstance(outcome["alice"], Retrieved) and outcome["alice"].hits
    assert len(docs.embedder.batches[1]) == 2  # bob and alice were one batch


async def test_a_full_mailbox_makes_searches_wait_their_turn_not_fail():
    gate = threading.Event()
    docs = documents(gate)
    done: list[int] = []
    send_stats: list[Callable[[], trio.MemoryChannelStatistics]] = []
    async with running(docs, mailbox=2) as retriever, trio.open_nursery() as nursery:
        async def search(n: int) -> None:
            await retriever.search(query=f"redis {n}", user_id="u", collection=None, top_k=1,
                                   where=None)
            done.append(n)

        nursery.start_soon(search, 0)
        await entered(docs.embedder)
        for n in range(1, 5):
            nursery.start_soon(search, n)
        await trio.testing.wait_all_tasks_blocked()
        send_stats.append(retriever._mailbox.statistics)  # pyright: ignore[reportPrivateUsage]
        stats = send_stats[0]()
        assert (stats.current_buffer_used, stats.tasks_waiting_send) == (2, 2)
        gate.set()
    assert sorted(done) == [0, 1, 2, 3, 4]


def test_orders_ask_for_candidates_beyond_top_k():
    order = SearchOrder(query="q", names=["docs"], top_k=3, where=None)
    assert order.wanted > order.top_k


@pytest.mark.parametrize("query", ["", " ", "\x00", "a" * 10_000])
async def test_any_query_text_is_answered(query: str):
    docs = documents()
    async with running(docs) as retriever:
        found = await retriever.search(query=query, user_id="u", collection=None, top_k=2,
                                       where=None)
    assert [s.step for s in found.steps] == ["vector", "keyword", "rerank"]
