"""The keyword index every worker shares: BM25 in Postgres, over its 'english' lexemes.

An ingest publishes a whole generation of a collection's chunks and switches the
collection to it in the same transaction (migration 0006), so every worker's next
search sees the new documents and none sees half of them. A search reads only the
current generation. Postgres's own ranking (ts_rank) has no inverse document
frequency, so a word every chunk has would count as much as a rare name: the score
here is BM25 (the Lucene form, with bm25s's k1 and b), from a postings table, over the
query's words that are not in most chunks (COMMON).

Blocking (psycopg): call it from a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, LiteralString, cast

import psycopg
from psycopg.types.json import Jsonb

from actors.adapters.postgres import Postgres, apply_migrations
from actors.errors import TransientError

K1, B = 1.5, 0.75
# A query word in more than this share of the chunks is left out of the sum when the
# query has a rarer one: its IDF is under ln 2 (a rare name's is ~9 in 10,000 chunks),
# and summing its thousands of postings was most of a search's time.
COMMON = 0.5


class Superseded(TransientError):
    """Another ingest published the collection since this one read it."""


@dataclass(frozen=True)
class Chunk:
    """One chunk of a collection's current generation."""

    chunk_id: str
    vector_id: str  # its vector in the vector store
    source: str
    text: str
    metadata: dict[str, Any]


def _clean(text: str) -> str:
    """`text` as Postgres can hold it: no NUL, no lone surrogate (UTF-8 has none)."""
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text.replace("\x00", "")


_SEARCH = cast(LiteralString, f"""
WITH cur AS (
    SELECT collection, generation, chunks::float8 AS n, greatest(avg_length, 1) AS avg_length
    FROM rag_collections WHERE collection = %(collection)s),
terms AS (
    SELECT t.lexeme, t.df, ln(1.0 + (cur.n - t.df + 0.5) / (t.df + 0.5)) AS idf
    FROM cur JOIN rag_terms t USING (collection, generation)
    WHERE t.lexeme = ANY(tsvector_to_array(to_tsvector('english', %(query)s)))),
q AS (
    SELECT lexeme, idf FROM terms, cur
    WHERE df <= cur.n * {COMMON} OR NOT EXISTS (SELECT FROM terms WHERE df <= cur.n * {COMMON})),
scored AS (
    SELECT p.n, sum(q.idf * p.tf * {K1 + 1}
                    / (p.tf + {K1} * (1 - {B} + {B} * p.length / cur.avg_length))) AS score
    FROM cur JOIN rag_postings p USING (collection, generation) JOIN q USING (lexeme)
    GROUP BY p.n ORDER BY score DESC, p.n LIMIT %(k)s)
SELECT c.chunk_id, c.vector_id, c.source, c.body, c.metadata, s.score
FROM scored s JOIN cur ON true
JOIN rag_chunks c ON c.collection = cur.collection AND c.generation = cur.generation AND c.n = s.n
ORDER BY s.score DESC, s.n
""")


class KeywordIndex:
    """The shared keyword index and chunk texts, on the pool of a `Postgres`."""

    def __init__(self, pg: Postgres) -> None:
        self._pg = pg
        self._migrated = False

    def _call(self, fn: Any) -> Any:
        if not self._migrated:  # the CLI may be the first to touch the database
            self._pg.call(apply_migrations)
            self._migrated = True
        return self._pg.call(fn)

    def generation(self, collection: str) -> int | None:
        """The collection's current generation, or None when it was never published."""
        row = self._call(lambda conn: conn.execute(
            "SELECT generation FROM rag_collections WHERE collection = %s",
            (collection,)).fetchone())
        return None if row is None else int(row[0])

    def current(self, collection: str) -> tuple[int | None, dict[str, Chunk]]:
        """The current generation (None: never published) and its chunks, by chunk id."""

        def read(conn: psycopg.Connection[Any]) -> tuple[int | None, dict[str, Chunk]]:
            row = conn.execute("SELECT generation FROM rag_collections WHERE collection = %s",
                               (collection,)).fetchone()
            if row is None:
                return None, {}
            rows = conn.execute(
                "SELECT chunk_id, vector_id, source, body, metadata FROM rag_chunks "
                "WHERE collection = %s AND generation = %s", (collection, row[0])).fetchall()
            return int(row[0]), {r[0]: Chunk(*r) for r in rows}

        return self._call(read)

    def resolve(self, collection: str, vector_ids: Sequence[str]) -> dict[str, Chunk]:
        """The current generation's chunks among `vector_ids`, by vector id: a vector
        that an ingest in progress wrote, or one a finished ingest dropped, is absent."""
        if not vector_ids:
            return {}
        rows = self._call(lambda conn: conn.execute(
            "SELECT c.chunk_id, c.vector_id, c.source, c.body, c.metadata FROM rag_chunks c "
            "JOIN rag_collections r USING (collection, generation) "
            "WHERE c.collection = %s AND c.vector_id = ANY(%s)",
            (collection, list(vector_ids))).fetchall())
        return {r[1]: Chunk(*r) for r in rows}

    def search(self, collection: str, query: str, k: int) -> list[tuple[Chunk, float]]:
        """The `k` best chunks of the current generation for `query` by BM25."""
        rows = self._call(lambda conn: conn.execute(
            _SEARCH, {"collection": collection, "query": _clean(query), "k": k}).fetchall())
        return [(Chunk(*r[:5]), float(r[5])) for r in rows]

    def publish(self, collection: str, chunks: Iterable[Chunk], *, based_on: int | None) -> int:
        """Write `chunks` as the collection's next generation and switch to it, in one
        transaction; earlier generations go. Returns the new generation. `based_on` is
        the generation the chunks were computed from: when another publish came first,
        nothing is written and Superseded says so (the caller computes again)."""
        rows = [(c.chunk_id, c.vector_id, _clean(c.source), _clean(c.text), Jsonb(c.metadata))
                for c in chunks]

        def write(conn: psycopg.Connection[Any]) -> int:
            # One publisher per collection at a time; searches never wait for it.
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                         (f"rag:{collection}",))
            row = conn.execute("SELECT generation FROM rag_collections WHERE collection = %s",
                               (collection,)).fetchone()
            now = None if row is None else int(row[0])
            if now != based_on:
                raise Superseded(f"collection {collection!r} is at generation {now}, "
                                 f"not {based_on}: another ingest published first")
            generation = 1 if now is None else now + 1
            key = {"c": collection, "g": generation}
            conn.execute("CREATE TEMP TABLE rag_incoming (n integer, chunk_id text, "
                         "vector_id text, source text, body text, metadata jsonb) ON COMMIT DROP")
            with conn.cursor().copy("COPY rag_incoming FROM STDIN") as copy:
                for n, r in enumerate(rows):
                    copy.write_row((n, *r))
            conn.execute("CREATE TEMP TABLE rag_lexemes ON COMMIT DROP AS "
                         "SELECT i.n, u.lexeme, cardinality(u.positions) AS tf "
                         "FROM rag_incoming i, unnest(to_tsvector('english', i.body)) u")
            conn.execute(
                "INSERT INTO rag_chunks (collection, generation, n, chunk_id, vector_id, source, "
                "body, metadata, length) SELECT %(c)s, %(g)s, i.n, i.chunk_id, i.vector_id, "
                "i.source, i.body, i.metadata, coalesce(l.length, 0) FROM rag_incoming i "
                "LEFT JOIN (SELECT n, sum(tf) AS length FROM rag_lexemes GROUP BY n) l USING (n)",
                key)
            conn.execute(
                "INSERT INTO rag_postings (collection, generation, lexeme, n, tf, length) "
                "SELECT %(c)s, %(g)s, x.lexeme, x.n, x.tf, c.length FROM rag_lexemes x "
                "JOIN rag_chunks c ON c.collection = %(c)s AND c.generation = %(g)s "
                "AND c.n = x.n", key)
            conn.execute("INSERT INTO rag_terms (collection, generation, lexeme, df) "
                         "SELECT %(c)s, %(g)s, lexeme, count(*) FROM rag_lexemes GROUP BY lexeme",
                         key)
            conn.execute(
                "INSERT INTO rag_collections (collection, generation, chunks, avg_length) "
                "SELECT %(c)s, %(g)s, count(*), coalesce(avg(length), 0) FROM rag_chunks "
                "WHERE collection = %(c)s AND generation = %(g)s "
                "ON CONFLICT (collection) DO UPDATE SET generation = excluded.generation, "
                "chunks = excluded.chunks, avg_length = excluded.avg_length, switched_at = now()",
                key)
            older = "WHERE collection = %(c)s AND generation <> %(g)s"
            conn.execute("DELETE FROM rag_chunks " + older, key)
            conn.execute("DELETE FROM rag_postings " + older, key)
            conn.execute("DELETE FROM rag_terms " + older, key)
            # Fresh statistics, so searches are planned for what the tables now hold.
            conn.execute("ANALYZE rag_chunks, rag_postings, rag_terms")
            return generation

        return self._call(write)
