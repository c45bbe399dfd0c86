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

import pytest

from actors.adapters.documents import DocumentStore
from actors.adapters.embeddings import configured_embedder
from actors.retriever import coverage, fuse
from config import Rag, load_config, stored_collection_name
from messages.wire import decode_request
from tests.helpers import events_of, job_row, produce, request, worker_running
from tests.scripted_llm import Reply
from tools import local_stack
from tools.ingest import freshness, ingest, refresh

CORPUS = {
    "tansu.md": "# Tansu\nTansu is a Kafka-compatible broker written in Rust.\n\n"
                "## Groups\nA consumer group join takes about half the session timeout.\n",
    "redis.md": "# Redis streams\nXADD appends an entry to a stream. Entries have ids "
                "that only grow, so a reader can resume after the last id it saw.\n",
    "postgres.md": "# Group commit\nBatching many rows into one transaction shares one fsync, "
                   "so each row costs microseconds instead of milliseconds.\n",
}


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
def store_of() -> Iterator[Callable[[Rag], DocumentStore]]:
    """DocumentStores for a config, closed when the test ends."""
    opened: list[DocumentStore] = []

    def open_store(rag: Rag) -> DocumentStore:
        opened.append(DocumentStore.from_config(rag))
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def rag_config(tmp_path, chroma):
    return load_config(environ={"CHAT_ACTORS__RAG__PATH": str(tmp_path / "rag"), **chroma})


def test_ingest_reingest_change_and_delete(tmp_path, rag_config, store_of):
    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    store = store_of(rag_config.rag)
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


def test_freshness_reports_and_refreshes_stale_chunks(tmp_path, rag_config, monkeypatch,
                                                      store_of):
    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    store = store_of(rag_config.rag)
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
                                                                db, tmp_path, chroma, store_of):
    config, _ = make_config(environ=chroma)
    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    ingest(store_of(config.rag), config, "user-alice", [docs], root=tmp_path)
    llm.default = Reply(tokens=("It", " shares", " one", " fsync", " [1]."))
    req = request("How does group commit make Postgres writes cheap?", mode="rag",
                  rag={"topK": 2})
    async with worker_running(config):
        produce(config, req)
        events = await events_of(rds, config, req["jobId"])
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
    row = job_row(db, req["jobId"])
    assert row["retrieval_hits"] == 2 and row["retrieval_ms"] >= 0


async def test_a_user_cannot_search_another_users_collection(make_config, llm, rds, tmp_path,
                                                            chroma, store_of):
    config, _ = make_config(environ=chroma)
    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    ingest(store_of(config.rag), config, "user-alice", [docs], root=tmp_path)
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
    from actors.retriever import Retriever

    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    store = store_of(rag_config.rag)
    ingest(store, rag_config, "user-alice", [docs], root=tmp_path)
    found = await Retriever(store, rag_config,
                            embedder=partial(configured_embedder, rag_config.rag)).search(
        query="stream entries and group commit", user_id="alice", collection="user-alice",
        top_k=5, where={"source": "docs/redis.md"})
    for step in found.steps:
        assert {h.source for h in step.hits} <= {"docs/redis.md"}
    assert [h.id for h in found.hits] == ["docs/redis.md#0"]


async def test_the_filters_the_decoder_passes_are_ones_chroma_accepts(rag_config, tmp_path,
                                                                       store_of):
    # The other side of the typed rag.where (tests/test_messages.py): what passes the
    # decoder must not make the real Chroma refuse the search.
    from actors.retriever import Retriever

    docs = tmp_path / "docs"
    write_corpus(docs, CORPUS)
    store = store_of(rag_config.rag)
    ingest(store, rag_config, "user-alice", [docs], root=tmp_path)
    retriever = Retriever(store, rag_config, embedder=partial(configured_embedder, rag_config.rag))
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
    from actors.errors import PermanentError
    from actors.retriever import Retriever

    store = store_of(rag_config.rag)
    for n, user in enumerate(LOOKALIKES):
        docs = tmp_path / f"docs{n}"
        write_corpus(docs, {f"secret{n}.md": f"# Secret {n}\nThe vault code of {user} is "
                                              f"{1000 + n}. Tansu brokers keep it.\n"})
        ingest(store, rag_config, f"user-{user}", [docs], root=tmp_path)
    retriever = Retriever(store, rag_config,
                          embedder=partial(configured_embedder, rag_config.rag))
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
        tmp_path, monkeypatch, store_of):
    from actors.errors import PermanentError
    from actors.retriever import Retriever

    workdir = tmp_path / "chroma-server"
    workdir.mkdir()
    chroma_server = local_stack.start_chroma(workdir)
    proxy, seen = token_proxy(chroma_server.url, "tok-3f9a1c7e5b")
    try:
        config = load_config(environ={
            "CHAT_ACTORS__RAG__PATH": str(tmp_path / "rag"),
            "CHAT_ACTORS__RAG__CHROMA_URL": f"http://127.0.0.1:{proxy.server_address[1]}"})
        docs = tmp_path / "docs"
        write_corpus(docs, CORPUS)
        monkeypatch.setenv("CHAT_ACTORS_CHROMA_TOKEN", "tok-3f9a1c7e5b")
        store = store_of(config.rag)
        ingest(store, config, "user-alice", [docs], root=tmp_path)
        found = await Retriever(store, config,
                                embedder=partial(configured_embedder, config.rag)).search(
            query="group commit fsync", user_id="alice", collection="user-alice", top_k=2,
            where=None)
        assert found.hits and found.hits[0].source == "docs/postgres.md"
        assert len(seen) > 3 and set(seen) == {"tok-3f9a1c7e5b"}
        for value in ("wrong-token", None):  # a wrong token, and none at all
            if value is None:
                monkeypatch.delenv("CHAT_ACTORS_CHROMA_TOKEN")
            else:
                monkeypatch.setenv("CHAT_ACTORS_CHROMA_TOKEN", value)
            with pytest.raises(PermanentError, match="refused the token.*rag.chroma_token_env"):
                store_of(config.rag).chunks_of("user-alice")
    finally:
        proxy.shutdown()
        proxy.server_close()
        chroma_server.stop()
