"""RAG mode: ingestion with freshness, hybrid retrieval, scoping, and jobs end to end."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from actors.adapters.rag.documents import DocumentStore
from actors.adapters.rag.embeddings import configured_embedder
from actors.adapters.rag.ingestion import UPLOAD
from actors.retriever import Retriever, coverage, fuse, retriever_running
from config import Config, load_config, stored_collection_name
from messages.wire import decode_request
from tests.helpers import events_of, job_row, produce, request, worker_running
from tests.scripted_llm import Reply
from tests.test_telemetry import Recorded, job_trace
from tools import local_stack
from tools.ingest import apply, freshness, ingest, refresh

CORPUS = {
    "tansu.md": "# Tansu\nTansu is a Kafka-compatible broker written in Rust.\n\n"
                "## Groups\nA consumer group join takes about half the session timeout.\n",
    "redis.md": "# Redis streams\nXADD appends an entry to a stream. Entries have ids "
                "that only grow, so a reader can resume after the last id it saw.\n",
    "postgres.md": "# Group commit\nBatching many rows into one transaction shares one fsync, "
                   "so each row costs microseconds instead of milliseconds.\n",
}


def running(store: DocumentStore, config: Config):
    """A retriever actor over `store`, for the block."""
    return retriever_running(store, config, embedder=partial(configured_embedder, config.rag))


def write_corpus(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


@pytest.fixture(params=["embedded", "server"])
def chroma(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The Chroma a RAG test runs against, as config overrides: embedded, then a
    `chroma run` server of the test's own (the package ships it)."""
    if request.param == "embedded":
        yield {}
        return
    workdir = tmp_path / "chroma-server"
    workdir.mkdir()
    server = local_stack.start_chroma(workdir)
    try:
        yield {"CHAT_ACTORS__RAG__CHROMA_URL": server.url}
    finally:
        server.stop()


@pytest.fixture
def store_of() -> Iterator[Callable[[Config], DocumentStore]]:
    """DocumentStores for a config, closed when the test ends."""
    opened: list[DocumentStore] = []

    def open_store(config: Config) -> DocumentStore:
        opened.append(DocumentStore.from_config(config))
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def rag_env(chroma, fresh_dsn):
    """Config overrides of a RAG test: its Chroma and a database of its own."""
    return {**chroma, "CHAT_ACTORS__POSTGRES__DSN": fresh_dsn}


@pytest.fixture
def rag_config(tmp_path, rag_env):
    return load_config(environ={"CHAT_ACTORS__RAG__PATH": str(tmp_path / "rag"), **rag_env})


def test_ingest_reingest_change_and_delete(tmp_path, rag_config, store_of):
    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    store = store_of(rag_config)
    first = ingest(store, rag_config, "user-alice", [docs], root=tmp_path)
    assert (len(first.added), first.changed, first.unchanged) == (4, [], 0)
    assert sorted(store.chunks_of("user-alice")) == [
        "docs/postgres.md#0", "docs/redis.md#0", "docs/tansu.md#0", "docs/tansu.md#1"]
    meta = store.chunks_of("user-alice")["docs/redis.md#0"]
    assert meta["embedding_model"] == rag_config.rag.embedding_model
    assert meta["source"] == "docs/redis.md" and len(meta["content_hash"]) == 32

    again = ingest(store, rag_config, "user-alice", [docs], root=tmp_path)
    assert (again.added, again.changed, again.unchanged, again.deleted) == ([], [], 4, [])

    (docs / "redis.md").write_text("# Redis streams\nXTRIM caps a stream's length.\n")
    (docs / "tansu.md").unlink()
    planned = ingest(store, rag_config, "user-alice", [docs], root=tmp_path, dry_run=True)
    assert planned.changed == ["docs/redis.md#0"]
    assert sorted(planned.deleted) == ["docs/tansu.md#0", "docs/tansu.md#1"]
    assert len(store.chunks_of("user-alice")) == 4  # a dry run changes nothing
    ingest(store, rag_config, "user-alice", [docs], root=tmp_path)
    assert sorted(store.chunks_of("user-alice")) == ["docs/postgres.md#0", "docs/redis.md#0"]
    hits = store.keyword_search("user-alice", "XTRIM", 3, None)  # BM25 was rebuilt too
    assert [h.id for h in hits] == ["docs/redis.md#0"]


def test_documents_stored_before_origins_were_recorded_lose_no_upload(tmp_path, rag_config,
                                                                    store_of):
    # A collection as an earlier version left it: no chunk says where its document came
    # from. In a user's collection, a document whose name is no path may be an upload:
    # the CLI keeps it. One under a path is a CLI document: deleted once left out.
    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    store = store_of(rag_config)
    ingest(store, rag_config, "user-erin", [docs], root=tmp_path)
    ingest(store, rag_config, "towns", [docs], root=tmp_path)
    apply(store, rag_config, "user-erin", {"upload.md": "# Mine\nErin's own notes.\n"},
          origin=UPLOAD)
    apply(store, rag_config, "towns", {"top.md": "# Top\nA file at the top.\n"})
    with psycopg.connect(rag_config.postgres.dsn, autocommit=True) as conn:
        conn.execute("UPDATE rag_chunks SET metadata = metadata - 'origin'")
    assert all("origin" not in m for m in store.chunks_of("user-erin").values())

    report = ingest(store, rag_config, "user-erin", [docs / "redis.md"], root=tmp_path)
    assert {c.source for c in store.chunks("user-erin").values()} == {
        "docs/redis.md", "upload.md"}
    assert report.kept_uploads == ["upload.md"]
    assert "kept 1 uploaded documents (upload.md)" in report.summary()
    # Re-ingested, it is marked now; the upload stays unmarked (nothing rewrote it).
    assert store.chunks_of("user-erin")["docs/redis.md#0"]["origin"] == "ingest"
    # A collection no user owns holds no uploads: a top-level name there is the CLI's.
    ingest(store, rag_config, "towns", [docs / "redis.md"], root=tmp_path)
    assert {c.source for c in store.chunks("towns").values()} == {"docs/redis.md"}


def test_freshness_reports_and_refreshes_stale_chunks(tmp_path, rag_config, monkeypatch,
                                                      store_of):
    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    store = store_of(rag_config)
    ingest(store, rag_config, "shared", [docs], root=tmp_path)
    assert freshness(store, rag_config, "shared").too_old == []
    # 100 days later, every chunk is older than max_age_days (90).
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 100 * 86400)
    state = freshness(store, rag_config, "shared")
    assert (state.total, len(state.too_old), state.other_model) == (4, 4, [])
    assert refresh(store, rag_config, "shared") == 4
    assert freshness(store, rag_config, "shared").too_old == []
    other = load_config(environ={"CHAT_ACTORS__RAG__PATH": rag_config.rag.path,
                                 "CHAT_ACTORS__RAG__EMBEDDING_MODEL": "openai/other"})
    assert rag_config.rag.embedding_model != "openai/other"
    assert len(freshness(store, other, "shared").other_model) == 4


def test_fusion_and_lexical_coverage():
    from messages.ports import Hit

    def hit(i):
        return Hit(id=i, text=i, source="s", score=0.0, metadata={})

    fused = fuse([[hit("a"), hit("b"), hit("c")], [hit("c"), hit("a")]], 3)
    assert [h.id for h in fused] == ["a", "c", "b"]  # in both lists beats one top rank
    assert coverage("group commit fsync", "one fsync per group commit") == 1.0
    assert coverage("group commit fsync", "unrelated") == 0.0


async def test_rag_job_streams_retrieval_then_a_grounded_answer(make_config, stack, llm, rds,
                                                                tmp_path, rag_env, store_of):
    config, _ = make_config(environ=rag_env)
    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    ingest(store_of(config), config, "user-alice", [docs], root=tmp_path)
    llm.default = Reply(tokens=("It", " shares", " one", " fsync", " [1]."))
    req = request("How does group commit make Postgres writes cheap?", mode="rag",
                  rag={"topK": 2})
    traced = Recorded()
    try:
        async with worker_running(config, telemetry=traced.telemetry):
            produce(config, req)
            events = await events_of(rds, config, req["jobId"])
        spans = {s.name: s for s in job_trace(traced, req["jobId"])}
    finally:
        traced.telemetry.close()
    # Its trace has a retrieval span, under the job's, ended before the model call began.
    (root,) = [s for s in spans.values() if s.name.startswith("process ")]
    retrieval, chat = spans["retrieval"], spans["chat scripted-model"]
    assert retrieval.parent is not None and retrieval.parent.span_id == root.context.span_id
    assert (retrieval.end_time or 0) <= (chat.start_time or 0)
    assert not [k for k in (retrieval.attributes or {}) if k.startswith("gen_ai.")]
    kinds = [e["event"] for e in events]
    assert kinds[:4] == ["started", "retrieval", "retrieval", "retrieval"]
    steps = [e["data"] for e in events if e["event"] == "retrieval"]
    assert [s["step"] for s in steps] == ["vector", "keyword", "rerank"]
    top = steps[-1]["hits"][0]
    assert top["id"] == "docs/postgres.md#0" and top["source"] == "docs/postgres.md"
    assert "fsync" in top["snippet"] and len(steps[-1]["hits"]) == 2
    # The model was given the chunk, tagged with its source.
    system = [m["content"] for m in llm.calls[0].messages if m["role"] == "system"]
    assert "[1] (docs/postgres.md)" in system[1] and "shares one fsync" in system[1]
    final = events[-2]["data"]
    assert final["sources"][0] == "docs/postgres.md#0"
    with psycopg.connect(config.postgres.dsn, autocommit=True) as db:
        row = job_row(db, req["jobId"])
    assert row["retrieval_hits"] == 2 and row["retrieval_ms"] >= 0


async def test_a_user_cannot_search_another_users_collection(make_config, llm, rds, tmp_path,
                                                            rag_env, store_of):
    config, _ = make_config(environ=rag_env)
    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    ingest(store_of(config), config, "user-alice", [docs], root=tmp_path)
    nosy = request("What does alice know about Tansu?", userId="bob", mode="rag",
                   rag={"collection": "user-alice"})
    plain = request("Tansu broker", userId="bob", mode="rag")
    async with worker_running(config):
        produce(config, nosy, plain)
        denied = await events_of(rds, config, nosy["jobId"])
        own = await events_of(rds, config, plain["jobId"])
    assert denied[-2]["data"]["code"] == "forbidden"
    assert denied[-1]["data"]["status"] == "failed"
    assert "retrieval" not in [e["event"] for e in denied]
    # bob's own search never reaches alice's documents.
    assert all(step["data"]["hits"] == [] for step in own if step["event"] == "retrieval")
    assert own[-1]["data"]["status"] == "completed"


async def test_where_filters_both_searches(rag_config, tmp_path, store_of):
    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    store = store_of(rag_config)
    ingest(store, rag_config, "user-alice", [docs], root=tmp_path)
    async with running(store, rag_config) as retriever:
        found = await retriever.search(
            query="stream entries and group commit", user_id="alice", collection="user-alice",
            top_k=5, where={"source": "docs/redis.md"})
    for step in found.steps:
        assert {h.source for h in step.hits} <= {"docs/redis.md"}
    assert [h.id for h in found.hits] == ["docs/redis.md#0"]


async def test_the_filters_the_decoder_passes_are_ones_chroma_accepts(rag_config, tmp_path,
                                                                       store_of):
    # The other side of the typed rag.where (tests/test_messages.py): what passes the
    # decoder must not make the real Chroma refuse the search.
    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    store = store_of(rag_config)
    ingest(store, rag_config, "user-alice", [docs], root=tmp_path)
    async with running(store, rag_config) as retriever:
        await filters_pass(retriever)


async def filters_pass(retriever: Retriever) -> None:
    for where in ({"source": "docs/redis.md"}, {"chunk_index": {"$gte": 0}},
                  {"source": {"$in": ["docs/redis.md", "x"]}},
                  {"$and": [{"source": {"$ne": "x"}},
                            {"$or": [{"chunk_index": {"$lt": 3}}, {"source": "y"}]}]}):
        request = json.dumps({"jobId": "j", "userId": "alice", "sessionId": "s",
                              "message": "m", "rag": {"where": where}}).encode()
        decoded = decode_request(request, max_message_chars=100, model_aliases=frozenset())
        assert decoded.rag is not None and decoded.rag.where is not None
        found = await retriever.search(query="stream entries", user_id="alice",
                                       collection="user-alice", top_k=3,
                                       where=decoded.rag.where)
        assert found.hits, where


@pytest.mark.parametrize("away", ["refusing", "silent"])
async def test_a_chroma_server_that_is_down_is_waited_for_not_read_as_no_documents(
        make_config, llm, rds, away):
    # It used to answer without sources, as if the user had none, with /readyz green;
    # a server that accepted and never answered held the job's thread forever.
    from tests.helpers import readyz, until
    from tools.local_stack import free_port

    with socket.socket() as silent:
        if away == "silent":  # the kernel accepts connections; nobody ever answers
            silent.bind(("127.0.0.1", 0))
            silent.listen(64)
        port = silent.getsockname()[1] if away == "silent" else free_port()
        config, _ = make_config(environ={"CHAT_ACTORS__RAG__CHROMA_URL": f"http://127.0.0.1:{port}",
                                         "CHAT_ACTORS__RAG__CHROMA_TIMEOUT_S": "0.5"})
        req = request("What do my documents say?", mode="rag", timeoutS=3)
        async with worker_running(config) as worker:
            produce(config, req)
            await until(lambda: worker.health.failures["chroma"] >= 2)
            status, report = await readyz(worker.health_port)
            events = await events_of(rds, config, req["jobId"])
    cause = "Connection refused" if away == "refusing" else "no answer in time"
    assert status == 503 and f"chroma at http://127.0.0.1:{port}" in report["down"]["chroma"]
    assert cause in report["down"]["chroma"]
    assert [e["event"] for e in events][-2:] == ["error", "done"]
    assert events[-1]["data"]["status"] == "timeout" and not llm.calls


# Chroma's rules, and a case-insensitive file system's (the keyword index's folder).
_CHROMA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,510}[A-Za-z0-9]$")
LOOKALIKES = ["acme:bob", "acme-bob", "acme.bob", "Acme-Bob", "acme_bob", "acme--bob",
              "acme/bob", "acme bob", "acme-bob_"]


def test_collection_names_are_one_to_one_and_valid():
    names = [f"user-{u}" for u in LOOKALIKES] + [
        "ab", "_lead", "trail-", "a" * 600, "a" * 601, "日本語", "..", "a..b", "c", "x_y",
        stored_collection_name("user-acme:bob")]  # a stored name, used as a raw one
    stored = [stored_collection_name(n) for n in names]
    assert len({s.lower() for s in stored}) == len(names)
    for name, s in zip(names, stored, strict=True):
        assert _CHROMA_NAME.match(s) and ".." not in s, (name, s)
    assert stored_collection_name("user-alice") == "user-alice"  # plain names unchanged


async def test_user_ids_differing_only_in_punctuation_or_case_never_share_documents(
        rag_config, tmp_path, store_of):
    store = store_of(rag_config)
    for n, user in enumerate(LOOKALIKES):
        docs = tmp_path / f"docs{n}"
        write_corpus(docs, {f"secret{n}.md": f"# Secret {n}\nThe vault code of {user} is "
                                              f"{1000 + n}. Tansu brokers keep it.\n"})
        ingest(store, rag_config, f"user-{user}", [docs], root=tmp_path)
    async with running(store, rag_config) as retriever:
        await only_their_own(retriever)


async def only_their_own(retriever: Retriever) -> None:
    from actors.errors import PermanentError

    for n, user in enumerate(LOOKALIKES):
        found = await retriever.search(query="vault code Tansu", user_id=user, collection=None,
                                       top_k=5, where=None)
        sources = {h.source for step in found.steps for h in step.hits}
        assert sources == {f"docs{n}/secret{n}.md"}, (user, sources)
    for asker, owner in [("acme:bob", "acme-bob"), ("Acme-Bob", "acme-bob"),
                         ("acme-bob", "acme.bob")]:
        with pytest.raises(PermanentError) as refused:
            await retriever.search(query="vault code", user_id=asker,
                                   collection=f"user-{owner}", top_k=5, where=None)
        assert refused.value.code == "forbidden"


def token_proxy(upstream: str, token: str) -> tuple[ThreadingHTTPServer, list[str | None]]:
    """An authenticating proxy in front of a Chroma server (Chroma 1.x's server checks
    no token itself): X-Chroma-Token must be `token`, or 401."""
    target = urlsplit(upstream)
    seen: list[str | None] = []

    class Relay(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def relay(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append(self.headers.get("X-Chroma-Token"))
            if seen[-1] != token:
                status, headers, reply = 401, {"Content-Type": "application/json"}, \
                    b'{"error": "Unauthorized"}'
            else:
                conn = http.client.HTTPConnection(target.hostname or "", target.port, timeout=10)
                forward = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", "content-length")}
                conn.request(self.command, self.path, body=body or None, headers=forward)
                answer = conn.getresponse()
                status, reply = answer.status, answer.read()
                headers = {"Content-Type": answer.getheader("Content-Type") or "application/json"}
                conn.close()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = relay

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


async def test_the_chroma_token_goes_with_every_request_and_a_refused_one_is_named(
        tmp_path, monkeypatch, store_of, fresh_dsn):
    from actors.errors import PermanentError

    workdir = tmp_path / "chroma-server"
    workdir.mkdir()
    chroma_server = local_stack.start_chroma(workdir)
    proxy, seen = token_proxy(chroma_server.url, "tok-3f9a1c7e5b")
    try:
        config = load_config(environ={
            "CHAT_ACTORS__RAG__PATH": str(tmp_path / "rag"), "CHAT_ACTORS__POSTGRES__DSN": fresh_dsn,
            "CHAT_ACTORS__RAG__CHROMA_URL": f"http://127.0.0.1:{proxy.server_address[1]}"})
        docs = tmp_path / "docs"
        write_corpus(docs, CORPUS)
        monkeypatch.setenv("CHAT_ACTORS_CHROMA_TOKEN", "tok-3f9a1c7e5b")
        store = store_of(config)
        ingest(store, config, "user-alice", [docs], root=tmp_path)
        async with running(store, config) as retriever:
            found = await retriever.search(query="group commit fsync", user_id="alice",
                                           collection="user-alice", top_k=2, where=None)
        assert found.hits and found.hits[0].source == "docs/postgres.md"
        assert len(seen) > 3 and set(seen) == {"tok-3f9a1c7e5b"}
        for value in ("wrong-token", None):  # a wrong token, and none at all
            if value is None:
                monkeypatch.delenv("CHAT_ACTORS_CHROMA_TOKEN")
            else:
                monkeypatch.setenv("CHAT_ACTORS_CHROMA_TOKEN", value)
            with pytest.raises(PermanentError, match="refused the token.*rag.chroma_token_env"):
                store_of(config).vectors_present("user-alice", ["docs/postgres.md#0@0"])
    finally:
        proxy.shutdown()
        proxy.server_close()
        chroma_server.stop()


def test_a_reingest_appears_to_every_worker_at_once_and_never_by_halves(tmp_path, rag_config,
                                                                         store_of):
    # Two workers' stores over one Chroma and one Postgres. The re-ingest of worker A is
    # held after its new vectors are written and before it publishes: worker B still
    # sees the old collection whole (no new vector, no new keyword); once published,
    # the new one whole (no old vector left).
    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    writer, reader = store_of(rag_config), store_of(rag_config)
    ingest(writer, rag_config, "shared", [docs], root=tmp_path)
    assert [h.id for h in reader.keyword_search("shared", "XADD entries", 3, None)] == [
        "docs/redis.md#0"]
    (docs / "redis.md").write_text("# Redis streams\nXTRIM caps a stream's length.\n")
    held, go = threading.Event(), threading.Event()
    publish = writer.keywords.publish

    def held_publish(*args, **kwargs):
        held.set()
        assert go.wait(30)
        return publish(*args, **kwargs)

    writer.keywords.publish = held_publish  # type: ignore[method-assign]
    ingesting = threading.Thread(target=ingest, args=(writer, rag_config, "shared", [docs]),
                                 kwargs={"root": tmp_path})
    ingesting.start()
    try:
        assert held.wait(60)
        query = configured_embedder(rag_config.rag).embed(["XTRIM caps a stream's length"])[0]
        during = reader.vector_search_many("shared", [query], 10, None)[0]
        assert during and all("XTRIM" not in h.text for h in during)
        assert "XADD" in next(h.text for h in during if h.id == "docs/redis.md#0")
        assert reader.keyword_search("shared", "XTRIM", 3, None) == []
    finally:
        go.set()
        ingesting.join()
    after = reader.vector_search_many("shared", [query], 10, None)[0]
    assert after[0].id == "docs/redis.md#0" and "XTRIM" in after[0].text
    assert all("XADD" not in h.text for h in after)  # the old vector is gone
    assert [h.id for h in reader.keyword_search("shared", "XTRIM", 3, None)] == [
        "docs/redis.md#0"]
    assert reader.keyword_search("shared", "XADD", 3, None) == []
    assert writer.keywords.generation("shared") == 2


def test_keyword_search_ranks_by_bm25_over_the_current_generation(tmp_path, rag_config,
                                                                  store_of):
    # A word in most chunks counts for little (its inverse document frequency is under
    # ln 2; Postgres's own ts_rank has none) and is left out next to a rarer one.
    docs = tmp_path / "docs"
    write_corpus(docs, {f"town{n}.md": f"# Town {n}\nThe town of {name} lies on a river. "
                                          "The river is wide and the river is slow.\n"
                        for n, name in enumerate(["Quelvath", "Ostrin", "Mardel", "Fenwick"])})
    store = store_of(rag_config)
    ingest(store, rag_config, "towns", [docs], root=tmp_path)
    hits = store.keyword_search("towns", "Which river is Mardel on?", 4, None)
    assert [h.source for h in hits] == ["docs/town2.md"]
    # Alone, the common word still finds every chunk that has it, the shortest first.
    alone = store.keyword_search("towns", "river", 4, None)
    assert len(alone) == 4 and alone[0].score >= alone[-1].score > 0
    assert store.keyword_search("towns", "the of and is", 4, None) == []  # stopwords only


@pytest.mark.parametrize("query", [
    "", "\x00", "a & b | !c", "'quoted' :* (x <-> y", "\ud800 lone surrogate",
    "日本語のテスト", "🦀" * 50, "x" * 100_000, "%s %(k)s {0}", "DROP TABLE rag_chunks; --"])
def test_any_query_text_is_searched_as_text(tmp_path, rag_config, store_of, query):
    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    store = store_of(rag_config)
    ingest(store, rag_config, "shared", [docs], root=tmp_path)
    assert store.keyword_search("shared", query, 5, None) == []
    vector = configured_embedder(rag_config.rag).embed([query])[0]
    assert len(store.vector_search_many("shared", [vector], 5, None)[0]) == 4
    assert len(store.chunks("shared")) == 4


def test_a_collection_ingested_before_the_shared_index_is_named_not_read_as_empty(
        rag_config, store_of):
    from actors.errors import PermanentError

    store = store_of(rag_config)
    # What an earlier version left: vectors in Chroma, its keyword index on a disk.
    store.upsert("old-docs", ["docs/a.md#0"], ["text"],
                 configured_embedder(rag_config.rag).embed(["text"]), [{"source": "docs/a.md"}])
    with pytest.raises(PermanentError, match="run `chat-actors ingest` for it again") as old:
        store.exists("old-docs")
    assert old.value.code == "reingest"
    assert store.exists("never-made") is False


def test_concurrent_ingests_into_one_collection_keep_both(tmp_path, rag_config, store_of):
    # Two uploads at once (two gateways, or two CLI runs): the one that publishes second
    # finds it was superseded, reads the collection again and keeps the other's document.
    store = store_of(rag_config)
    apply(store, rag_config, "user-carol", {"base.md": "# Base\nThe first document.\n"})
    read = store.snapshot
    both_read = threading.Barrier(2)
    calls = {"n": 0}

    def snapshot(name):
        got = read(name)
        calls["n"] += 1
        if calls["n"] <= 2:
            both_read.wait(30)  # each has read generation 1 before either publishes
        return got

    store.snapshot = snapshot  # type: ignore[method-assign]
    threads = [threading.Thread(target=apply, args=(store, rag_config, "user-carol",
                                                    {f"{n}.md": f"# Doc {n}\nText {n}.\n"}))
               for n in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls["n"] == 3  # the second publisher read again, once
    assert {c.source for c in store.chunks("user-carol").values()} == {
        "base.md", "one.md", "two.md"}
    vectors = store.vectors_present("user-carol", [c.vector_id for c in
                                                   store.chunks("user-carol").values()])
    assert len(vectors) == 3  # and every chunk's vector is there
