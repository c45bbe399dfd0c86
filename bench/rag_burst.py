"""A burst of concurrent RAG searches: the retriever actor against one search per job.

50 jobs search a 10,000-chunk collection at the same moment, five times, with
distinct questions. Each side is timed from the job's call to its answer (what
`llm_jobs.retrieval_ms` records): the actor (batched embeddings, one Chroma query
per collection per batch) and the path it replaced (bench/peers/rag_per_query.py:
each job embeds and searches alone, two threads at a time). Same store, same
Postgres, same process, one after the other.

    bin/chat-actors bench rag_burst [--chunks 10000] [--concurrency 50] [--bursts 5]
                                    [--quick] [--json FILE]

It writes the table as JSON (`--json`, default bench/results/rag_burst.json).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from actors.adapters.rag.embeddings import configured_embedder
from bench import result_options, write_result
from bench.peers.rag_per_query import PerQueryRetriever
from bench.retrieval_quality import (
    bench_store,
    big_collection,
    open_to_all,
    percentile,
    retriever_of,
)

GOAL_P99_MS = 150
QUICK_CHUNKS, QUICK_CONCURRENCY, QUICK_BURSTS = 300, 10, 2


async def burst(search: Callable[[str], Awaitable[object]], questions: list[str],
                timings: list[float]) -> None:
    async def one(question: str) -> None:
        t0 = time.perf_counter()
        await search(question)
        timings.append(1000 * (time.perf_counter() - t0))

    async with trio.open_nursery() as nursery:
        for question in questions:
            nursery.start_soon(one, question)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-actors bench rag_burst",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, help="default 10000")
    parser.add_argument("--concurrency", type=int, help="default 50")
    parser.add_argument("--bursts", type=int, help="default 5")
    result_options(parser, "rag_burst", f"{QUICK_CHUNKS:,} chunks, {QUICK_BURSTS} bursts of "
                   f"{QUICK_CONCURRENCY} (under a minute)")
    args = parser.parse_args(argv)
    quick = {"chunks": QUICK_CHUNKS, "concurrency": QUICK_CONCURRENCY, "bursts": QUICK_BURSTS}
    full = {"chunks": 10_000, "concurrency": 50, "bursts": 5}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    began = time.perf_counter()
    with bench_store("chat-actors-rag-burst-") as (_, config, store):
        started = time.perf_counter()
        questions = big_collection(store, config, args.chunks, random.Random(7))
        ingest_s = time.perf_counter() - started
        print(f"{args.chunks} chunks ingested in {ingest_s:.0f} s; "
              f"{args.bursts} bursts of {args.concurrency} concurrent searches (top 5)")
        shared = open_to_all(config, "big")
        rounds = [questions[i * args.concurrency:(i + 1) * args.concurrency]
                  for i in range(args.bursts + 1)]
        results: dict[str, list[float]] = {}

        async def actor_side() -> None:
            async with retriever_of(store, shared) as retriever:
                async def search(question: str) -> object:
                    return await retriever.search(query=question, user_id="bench",
                                                  collection=None, top_k=5, where=None)

                await burst(search, rounds[0], [])  # warm: model, caches
                results["retriever actor"] = []
                for questions_ in rounds[1:]:
                    await burst(search, questions_, results["retriever actor"])

        async def per_query_side() -> None:
            retriever = PerQueryRetriever(store, partial(configured_embedder, shared.rag))

            async def search(question: str) -> object:
                return await retriever.search(question, shared.rag.allowed("bench"), 5)

            await burst(search, rounds[0], [])
            results["one search per job"] = []
            for questions_ in rounds[1:]:
                await burst(search, questions_, results["one search per job"])

        trio.run(per_query_side)
        trio.run(actor_side)
        print(f"{'path':<20} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for name, timings in results.items():
            print(f"{name:<20} {percentile(timings, 0.5):8.0f} "
                  f"{percentile(timings, 0.99):8.0f} {max(timings):8.0f}")
        actor, peer = results["retriever actor"], results["one search per job"]
        p99 = percentile(actor, 0.99)
        print(f"p99: actor {p99:.0f} ms, {percentile(peer, 0.99) / p99:.1f}x better than "
              f"one search per job; goal <= {GOAL_P99_MS} ms "
              f"{'met' if p99 <= GOAL_P99_MS else 'NOT met'}")
    paths = [{"path": name, "searches": len(timings), "p50_ms": percentile(timings, 0.5),
              "p99_ms": percentile(timings, 0.99), "max_ms": max(timings)}
             for name, timings in results.items()]
    write_result(args.json, quick=args.quick, wall_s=time.perf_counter() - began,
                 chunks=args.chunks, concurrency=args.concurrency, bursts=args.bursts,
                 ingest_s=ingest_s, paths=paths, goal_p99_ms=GOAL_P99_MS,
                 goal_met=p99 <= GOAL_P99_MS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
