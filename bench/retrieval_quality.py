"""Retrieval quality and latency: vector-only, BM25-only, hybrid, hybrid + rerank.

The labelled set is built here, deterministically:
- 240 short documents about fictional towns. The names are made up, so no
  model has seen them. They come with 80 questions: 40 use the document's own
  words and 40 are paraphrased.
- This repository's README.md and docs/contract.md (the outside contract),
  with 20 hand-written questions in bench/data/repo_queries.json, each
  labelled by a phrase that the right chunks of those two files contain.

It prints recall@5 and MRR@10 for each method. It then times the full hybrid
search with rerank, as a job runs it, over 10,000 chunks (p50 and p99).

    bin/chat-actors bench retrieval_quality [--latency-chunks 10000] [--skip-latency]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio

from actors.adapters.documents import DocumentStore
from actors.adapters.embeddings import configured_embedder, embedder
from actors.retriever import Retriever, fuse
from config import load_config
from messages.ports import Hit
from tools.ingest import ingest

ROOT = Path(__file__).resolve().parent.parent
RIVERS = ["Amber", "Silt", "Corran", "Vell", "Mistwater", "Oxley", "Tarn", "Brisk"]
EXPORTS = ["saffron", "slate", "wool", "glassware", "cider", "copper wire", "paper", "honey"]
SYLLABLES = ["zor", "vath", "quel", "by", "mar", "tin", "osk", "ell", "dra", "nim", "fen", "ul"]


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


def evaluate(ranked: list[list[Hit]], relevant: list[set[str]]) -> tuple[float, float]:
    recall = mrr = 0.0
    for hits, wanted in zip(ranked, relevant, strict=True):
        ids = [h.id for h in hits]
        recall += any(i in wanted for i in ids[:5])
        mrr += next((1 / rank for rank, i in enumerate(ids[:10], 1) if i in wanted), 0.0)
    return recall / len(ranked), mrr / len(ranked)


def quality(workdir: Path) -> dict[str, tuple[float, float]]:
    rng = random.Random(11)
    config = load_config(environ={"CHAT_ACTORS__RAG__PATH": str(workdir / "quality")})
    docs = workdir / "corpus"
    docs.mkdir()
    towns = synthetic_towns(rng, 240)
    for town in towns:
        (docs / f"{town['name']}.md").write_text(town_text(town))
    repo_docs = [ROOT / "README.md", ROOT / "docs" / "contract.md"]
    for path in repo_docs:
        if path.exists():
            (docs / path.name).write_text(path.read_text())
    store = DocumentStore(path=Path(config.rag.path))
    ingest(store, config, "bench", [docs], root=workdir)
    chunks = store.chunks_of("bench")
    texts = store.documents("bench", list(chunks))
    queries: list[tuple[str, set[str]]] = []
    for question, name in town_queries(rng, towns):
        queries.append((question, {f"corpus/{name}.md#0"}))
    for question, phrase in json.loads((ROOT / "bench/data/repo_queries.json").read_text()):
        wanted = {i for i, (text, _) in texts.items() if phrase in text}
        if wanted:
            queries.append((question, wanted))
    print(f"corpus: {len(chunks)} chunks; {len(queries)} labelled queries")
    model = embedder(config.rag.embedding_model)
    results: dict[str, list[list[Hit]]] = {"vector only": [], "BM25 only": [], "hybrid (RRF)": [],
                                           "hybrid + rerank": []}
    for question, _ in queries:
        vector = store.vector_search("bench", model.embed([question])[0], 10, None)
        keyword = store.keyword_search("bench", question, 10, None)
        results["vector only"].append(vector)
        results["BM25 only"].append(keyword)
        results["hybrid (RRF)"].append(fuse([vector, keyword], 10))

    async def reranked() -> None:
        for question, _ in queries:
            found = await retriever.search(query=question, user_id="bench", collection=None,
                                           top_k=10, where=None)
            results["hybrid + rerank"].append(found.hits)

    config_grants = load_config(environ={"CHAT_ACTORS__RAG__PATH": config.rag.path,
                                         "CHAT_ACTORS__RAG__SHARED_COLLECTIONS": '["bench"]'})
    retriever = Retriever(store, config_grants,
                          embedder=partial(configured_embedder, config_grants.rag))
    trio.run(reranked)
    relevant = [wanted for _, wanted in queries]
    return {name: evaluate(ranked, relevant) for name, ranked in results.items()}


def latency(workdir: Path, chunks: int) -> tuple[float, float, float]:
    rng = random.Random(5)
    config = load_config(environ={"CHAT_ACTORS__RAG__PATH": str(workdir / "latency"),
                                  "CHAT_ACTORS__RAG__SHARED_COLLECTIONS": '["big"]'})
    store = DocumentStore(path=Path(config.rag.path))
    towns = synthetic_towns(rng, chunks)
    model = embedder(config.rag.embedding_model)
    started = time.perf_counter()
    for start in range(0, chunks, 512):
        batch = towns[start:start + 512]
        texts = [town_text(t) for t in batch]
        store.upsert("big", [t["name"] for t in batch], texts, model.embed(texts),
                     [{"source": t["name"]} for t in batch])
    store.rebuild_keyword_index("big")
    build_s = time.perf_counter() - started
    retriever = Retriever(store, config, embedder=partial(configured_embedder, config.rag))
    questions = [town_queries(rng, towns)[i][0] for i in range(60)]
    timings: list[float] = []

    async def run() -> None:
        for question in questions:
            t0 = time.perf_counter()
            await retriever.search(query=question, user_id="bench", collection=None, top_k=5,
                                   where=None)
            timings.append(1000 * (time.perf_counter() - t0))

    trio.run(run)
    timings = timings[5:]  # the first queries load the BM25 index and warm the model
    ordered = sorted(timings)
    return (statistics.median(ordered), ordered[min(len(ordered) - 1,
                                                    round(0.99 * (len(ordered) - 1)))], build_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-actors bench retrieval_quality",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-chunks", type=int, default=10_000)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("chromadb").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="chat-actors-retrieval-") as folder:
        workdir = Path(folder)
        scores = quality(workdir)
        print(f"{'method':<18} {'recall@5':>9} {'MRR@10':>7}")
        for name, (recall, mrr) in scores.items():
            print(f"{name:<18} {recall:9.3f} {mrr:7.3f}")
        if not args.skip_latency:
            p50, p99, build_s = latency(workdir, args.latency_chunks)
            print(f"hybrid + rerank latency over {args.latency_chunks} chunks: "
                  f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (index built in {build_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
