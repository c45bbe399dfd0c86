"""Retrieval quality and latency on two labelled sets, per method: vector only, BM25 in
Postgres (the shared index), BM25 with bm25s (the per-worker index it replaced),
hybrid (RRF), and hybrid + rerank (what a job gets, through the retriever actor).

The sets, each read only from inside this repository or a package:
- "repo": 240 short documents about fictional towns (made-up names no model has
  seen; 80 questions, 40 in the document's words and 40 paraphrased), plus this
  repository's README.md and docs/contract.md with 20 hand-written questions in
  bench/data/repo_queries.json, each labelled by a phrase the right chunks contain.
- "pydoc": the Python reference topics CPython ships (pydoc_data.topics, one
  document per topic) with 60 questions in bench/data/pydoc_queries.json, written
  from the topics' text before any retrieval was run on them; gold = the topic.

Scores count distinct documents: a document's second chunk in the ranking is not
a second answer. It prints recall@5, MRR@10 and each method's p50/p99 per query, then
times hybrid + rerank, one query at a time, over 10,000 chunks, and writes the tables
as JSON (`--json`, default bench/results/retrieval_quality.json).

    bin/chat-actors bench retrieval_quality [--latency-chunks 10000] [--skip-latency]
                                            [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from functools import partial
from pathlib import Path

import trio

from actors.adapters.rag.documents import DocumentStore
from actors.adapters.rag.embeddings import configured_embedder
from actors.retriever import Retriever, fuse, retriever_running
from bench import result_options, write_result
from bench.peers.bm25s_index import Bm25sIndex
from config import Config, load_config
from messages.ports import Hit
from tools import local_stack
from tools.ingest import apply, ingest

ROOT = Path(__file__).resolve().parent.parent
RIVERS = ["Amber", "Silt", "Corran", "Vell", "Mistwater", "Oxley", "Tarn", "Brisk"]
EXPORTS = ["saffron", "slate", "wool", "glassware", "cider", "copper wire", "paper", "honey"]
SYLLABLES = ["zor", "vath", "quel", "by", "mar", "tin", "osk", "ell", "dra", "nim", "fen", "ul"]
# --quick: the towns without this repository's long documents, the pydoc topics of the
# first questions only, and latency over fewer chunks (the long texts are what take the
# time: each of their chunks is a full window for the embedding model).
QUICK_PYDOC_QUESTIONS, QUICK_LATENCY_CHUNKS = 10, 300


def town_name(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def synthetic_towns(rng: random.Random, count: int) -> list[dict]:
    # 12**syllables names exist: take enough syllables for `count` distinct ones.
    syllables = 3 if count * 4 < len(SYLLABLES) ** 3 else 5
    names: set[str] = set()
    towns = []
    while len(towns) < count:
        name = town_name(rng, syllables)
        if name in names:
            continue
        names.add(name)
        towns.append({"name": name, "river": rng.choice(RIVERS), "year": rng.randint(900, 1900),
                      "export": rng.choice(EXPORTS), "mayor": town_name(rng) + " " +
                      rng.choice(["Reyes", "Okafor", "Lind", "Haas", "Moreau"])})
    return towns


def town_text(town: dict) -> str:
    return (f"# {town['name']}\n{town['name']} is a small town on the {town['river']} river, "
            f"founded in {town['year']}. Its main export is {town['export']}, and its mayor "
            f"is {town['mayor']}.\n")


def town_queries(rng: random.Random, towns: list[dict]) -> list[tuple[str, str]]:
    lexical = [
        lambda t: f"Which river is {t['name']} on?",
        lambda t: f"When was {t['name']} founded?",
        lambda t: f"What is the main export of {t['name']}?",
        lambda t: f"Who is the mayor of {t['name']}?",
    ]
    paraphrased = [
        lambda t: f"What waterway flows past the settlement called {t['name']}?",
        lambda t: f"In which year did people establish {t['name']}?",
        lambda t: f"What goods does {t['name']} mostly sell abroad?",
        lambda t: f"Who leads the local council in {t['name']}?",
    ]
    picked = rng.sample(towns, 80)
    return ([(rng.choice(lexical)(t), t["name"]) for t in picked[:40]]
            + [(rng.choice(paraphrased)(t), t["name"]) for t in picked[40:]])


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def evaluate(ranked: list[list[Hit]], relevant: list[set[str]]) -> tuple[float, float]:
    """recall@5 and MRR@10 over distinct documents."""
    recall = mrr = 0.0
    for hits, wanted in zip(ranked, relevant, strict=True):
        sources = list(dict.fromkeys(h.source for h in hits))
        recall += any(s in wanted for s in sources[:5])
        mrr += next((1 / rank for rank, s in enumerate(sources[:10], 1) if s in wanted), 0.0)
    return recall / len(ranked), mrr / len(ranked)


Labelled = list[tuple[str, set[str]]]  # question, the sources that answer it


def repo_set(store: DocumentStore, config: Config, workdir: Path, quick: bool) -> Labelled:
    rng = random.Random(11)
    docs = workdir / "corpus"
    docs.mkdir()
    towns = synthetic_towns(rng, 240)
    for town in towns:
        (docs / f"{town['name']}.md").write_text(town_text(town))
    ours = [] if quick else [ROOT / "README.md", ROOT / "docs" / "contract.md"]
    for path in ours:
        (docs / path.name).write_text(path.read_text())
    ingest(store, config, "repo", [docs], root=workdir)
    labelled: Labelled = [(q, {f"corpus/{name}.md"}) for q, name in town_queries(rng, towns)]
    if not ours:
        return labelled
    chunks = store.chunks("repo")
    for question, phrase in json.loads((ROOT / "bench/data/repo_queries.json").read_text()):
        sources = {c.source for c in chunks.values() if phrase in c.text}
        if not sources:
            raise SystemExit(f"bench/data/repo_queries.json: no chunk contains {phrase!r}")
        labelled.append((question, sources))
    return labelled


def pydoc_set(store: DocumentStore, config: Config, quick: bool) -> Labelled:
    from pydoc_data.topics import topics

    pairs = json.loads((ROOT / "bench/data/pydoc_queries.json").read_text())
    missing = [topic for _, topic in pairs if topic not in topics]
    if missing:
        raise SystemExit(f"bench/data/pydoc_queries.json: no topic {missing} in this Python")
    if quick:
        pairs = pairs[:QUICK_PYDOC_QUESTIONS]
        asked = {topic for _, topic in pairs}
        topics = {name: text for name, text in topics.items() if name in asked}
    apply(store, config, "pydoc", {f"{name}.txt": text for name, text in topics.items()})
    return [(question, {f"{topic}.txt"}) for question, topic in pairs]


@contextmanager
def bench_store(prefix: str) -> Iterator[tuple[Path, Config, DocumentStore]]:
    """A work folder, a Postgres of its own and a document store over both (embedded
    Chroma), for the length of the block."""
    import logging

    logging.getLogger("chromadb").setLevel(logging.ERROR)
    with local_stack.workdir(prefix) as workdir:
        pg = local_stack.start_postgres(workdir)
        try:
            config = load_config(environ={"CHAT_ACTORS__RAG__PATH": str(workdir / "rag"),
                                          "CHAT_ACTORS__POSTGRES__DSN": pg.url})
            store = DocumentStore.from_config(config)
            try:
                yield workdir, config, store
            finally:
                store.close()
        finally:
            pg.stop()


def open_to_all(config: Config, collection: str) -> Config:
    """`config` with `collection` shared with every user (the benches search as one)."""
    return load_config(environ={"CHAT_ACTORS__RAG__PATH": config.rag.path,
                                "CHAT_ACTORS__POSTGRES__DSN": config.postgres.dsn,
                                "CHAT_ACTORS__RAG__SHARED_COLLECTIONS": f'["{collection}"]'})


def retriever_of(store: DocumentStore, config: Config) -> AbstractAsyncContextManager[Retriever]:
    """A retriever actor over `store` with `config`'s embedding model, for the block."""
    return retriever_running(store, config, embedder=partial(configured_embedder, config.rag))


Method = Callable[[str], list[Hit]]


def quality(store: DocumentStore, config: Config, collection: str, labelled: Labelled,
            ) -> dict[str, tuple[float, float, float, float]]:
    """Each method's recall@5, MRR@10, p50 and p99 ms per query."""
    model = configured_embedder(config.rag)
    bm25s = Bm25sIndex(store.chunks(collection))

    def vector(q: str) -> list[Hit]:
        return store.vector_search_many(collection, [model.embed([q])[0]], 20, None)[0]

    def keyword(q: str) -> list[Hit]:
        return store.keyword_search(collection, q, 20, None)

    methods: dict[str, Method] = {
        "vector only": vector,
        "BM25, Postgres (shared)": keyword,
        "BM25, bm25s (per worker)": lambda q: bm25s.search(collection, q, 20),
        "hybrid (RRF)": lambda q: fuse([vector(q), keyword(q)], 20)}
    results: dict[str, tuple[float, float, float, float]] = {}
    relevant = [wanted for _, wanted in labelled]
    for name, method in methods.items():
        method(labelled[0][0])  # warm
        ranked, times = [], []
        for question, _ in labelled:
            t0 = time.perf_counter()
            ranked.append(method(question))
            times.append(1000 * (time.perf_counter() - t0))
        results[name] = (*evaluate(ranked, relevant), percentile(times, 0.5),
                         percentile(times, 0.99))
    ranked, times = [], []

    async def reranked() -> None:
        async with retriever_of(store, open_to_all(config, collection)) as r:
            await r.search(query=labelled[0][0], user_id="bench", collection=None, top_k=10,
                           where=None)
            for question, _ in labelled:
                t0 = time.perf_counter()
                found = await r.search(query=question, user_id="bench", collection=None,
                                       top_k=10, where=None)
                times.append(1000 * (time.perf_counter() - t0))
                ranked.append(found.hits)

    trio.run(reranked)
    results["hybrid + rerank"] = (*evaluate(ranked, relevant), percentile(times, 0.5),
                                  percentile(times, 0.99))
    return results


def big_collection(store: DocumentStore, config: Config, chunks: int,
                   rng: random.Random) -> list[str]:
    """A collection `big` of `chunks` town chunks; returns questions about them."""
    towns = synthetic_towns(rng, chunks)
    apply(store, config, "big", {f"{t['name']}.md": town_text(t) for t in towns})
    return [q for q, _ in town_queries(rng, towns)]


def latency(store: DocumentStore, config: Config, chunks: int) -> tuple[float, float, float]:
    started = time.perf_counter()
    questions = big_collection(store, config, chunks, random.Random(5))[:60]
    build_s = time.perf_counter() - started
    timings: list[float] = []

    async def run() -> None:
        async with retriever_of(store, open_to_all(config, "big")) as r:
            for question in questions:
                t0 = time.perf_counter()
                await r.search(query=question, user_id="bench", collection=None, top_k=5,
                               where=None)
                timings.append(1000 * (time.perf_counter() - t0))

    trio.run(run)
    timings = timings[5:]  # the first queries warm the model and the caches
    return percentile(timings, 0.5), percentile(timings, 0.99), build_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-actors bench retrieval_quality",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-chunks", type=int, help="default 10000")
    parser.add_argument("--skip-latency", action="store_true")
    result_options(parser, "retrieval_quality", "the 240 towns without README.md and "
                   f"docs/contract.md, the pydoc topics of the first {QUICK_PYDOC_QUESTIONS} "
                   f"questions, latency over {QUICK_LATENCY_CHUNKS} chunks (under a minute)")
    args = parser.parse_args(argv)
    if args.latency_chunks is None:
        args.latency_chunks = QUICK_LATENCY_CHUNKS if args.quick else 10_000
    began = time.perf_counter()
    tables: dict[str, dict[str, object]] = {}
    timed: dict[str, float | int] | None = None
    with bench_store("chat-actors-retrieval-") as (workdir, config, store):
        sets = {"repo": repo_set(store, config, workdir, args.quick),
                "pydoc": pydoc_set(store, config, args.quick)}
        for name, labelled in sets.items():
            chunks, answering = len(store.chunks(name)), len({s for _, w in labelled for s in w})
            print(f"\n{name} set: {chunks} chunks, {answering} answering documents, "
                  f"{len(labelled)} questions")
            print(f"{'method':<26} {'recall@5':>9} {'MRR@10':>7} {'p50 ms':>7} {'p99 ms':>7}")
            methods = []
            for method, (recall, mrr, p50, p99) in quality(store, config, name,
                                                           labelled).items():
                print(f"{method:<26} {recall:9.3f} {mrr:7.3f} {p50:7.1f} {p99:7.1f}")
                methods.append({"method": method, "recall_at_5": recall, "mrr_at_10": mrr,
                                "p50_ms": p50, "p99_ms": p99})
            tables[name] = {"chunks": chunks, "answering_documents": answering,
                            "questions": len(labelled), "methods": methods}
        if not args.skip_latency:
            p50, p99, build_s = latency(store, config, args.latency_chunks)
            print(f"\nhybrid + rerank, one query at a time over {args.latency_chunks} "
                  f"chunks: p50 {p50:.1f} ms, p99 {p99:.1f} ms (ingested in {build_s:.0f} s)")
            timed = {"chunks": args.latency_chunks, "p50_ms": p50, "p99_ms": p99,
                     "ingest_s": build_s}
    write_result(args.json, quick=args.quick, wall_s=time.perf_counter() - began, sets=tables,
                 latency=timed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
