"""Users' own documents through the gateway: upload, list, replace, delete, RAG over them,
hostile uploads, ingestion off the event loop, one user's uploads never holding
another's (PDF readers held by the test, bombs, deadlines, turns), and the CLI never
touching uploads. Real stack, real Chroma (embedded), real PDF reader processes."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from actors.adapters.rag.documents import DocumentStore
from actors.adapters.rag.uploads import PDF_READER
from actors.errors import PermanentError
from tests.helpers import events_of, gateway_running, produce, request, until, worker_running
from tests.pdfs import pdf_pages, pdf_with, shown
from tests.scripted_llm import Reply
from tests.test_gateway import bearer
from tools.ingest import ingest

HELD_READER = Path(__file__).with_name("held_pdf.py")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Held:
    """A PDF reader child of the gateway's, stopped before it reads, until `release`."""

    sha: str  # of the PDF it was given
    pid: int
    stream: trio.SocketStream

    async def release(self) -> None:
        await self.stream.send_all(b"go")
        await self.stream.aclose()


class HeldReaders:
    """The gateway's PDF reader command in these tests: each child (tests/held_pdf.py)
    reports here and waits for the test's word before it runs the real reader."""

    def __init__(self, listener: trio.SocketListener, where: Path) -> None:
        self.listener = listener
        self.command = (sys.executable, "-I", str(HELD_READER), str(where), PDF_READER[-1])
        self.accepted: list[trio.SocketStream] = []

    async def next(self) -> Held:
        """The next child to start reading (waits for it)."""
        stream = await self.listener.accept()
        self.accepted.append(stream)
        line = b""
        while not line.endswith(b"\n"):
            part = await stream.receive_some(200)
            assert part, "a held reader hung up before saying which PDF it has"
            line += part
        digest, pid = line.decode().split()
        return Held(digest, int(pid), stream)


@pytest.fixture
async def held() -> AsyncIterator[HeldReaders]:
    with tempfile.TemporaryDirectory(prefix="held-", dir="/tmp") as folder:
        where = Path(folder) / "readers.sock"  # short: a Unix socket path has 107 bytes
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(where))
        sock.listen(16)
        listener = trio.SocketListener(sock)
        readers = HeldReaders(listener, where)
        yield readers
        for stream in readers.accepted:  # a reader never let go (killed by the gateway)
            await stream.aclose()
        await listener.aclose()


async def put_into(answers: dict[str, httpx.Response], client: httpx.AsyncClient, user: str,
                   name: str, body: bytes) -> None:
    """PUT a document as `user`; its answer lands in `answers[name]`."""
    answers[name] = await client.put(f"/v1/documents/{name}", content=body,
                                     headers=bearer(user))


async def names_of(client: httpx.AsyncClient, user: str) -> list[str]:
    listed = (await client.get("/v1/documents", headers=bearer(user))).json()
    return [d["name"] for d in listed["documents"]]


@pytest.fixture
def docs_config(gw_config, fresh_dsn, tmp_path):
    def make(**environ: str):
        return gw_config(CHAT_ACTORS__POSTGRES__DSN=fresh_dsn,
                         CHAT_ACTORS__RAG__PATH=str(tmp_path / "rag"), **environ)
    return make


async def test_a_user_uploads_lists_replaces_and_deletes_and_rag_finds_their_documents(
        docs_config, llm, rds):
    config = docs_config()
    alice = bearer("doc-alice")
    notes = b"# Boat\nThe boat Quelvath is moored at pier nine, beside the lighthouse.\n"
    async with gateway_running(config) as (_, client):
        put = await client.put("/v1/documents/notes.md", content=notes, headers=alice)
        assert put.status_code == 201, put.text
        assert put.json() == {"name": "notes.md", "chunks": 1, "added": 1, "changed": 0,
                              "unchanged": 0, "deleted": 0}
        again = await client.put("/v1/documents/notes.md", content=notes, headers=alice)
        assert again.status_code == 200 and again.json()["unchanged"] == 1
        pdf = await client.put("/v1/documents/manual.pdf",
                               content=pdf_with("The Ostrin pump needs oil every spring."),
                               headers=alice)
        assert pdf.status_code == 201, pdf.text
        listed = (await client.get("/v1/documents", headers=alice)).json()
        assert [(d["name"], d["chunks"]) for d in listed["documents"]] == [
            ("manual.pdf", 1), ("notes.md", 1)]
        assert listed["limits"]["maxDocuments"] == config.rag.max_documents
        # Another user sees none of them and cannot delete them.
        bob = bearer("doc-bob")
        assert (await client.get("/v1/documents", headers=bob)).json()["documents"] == []
        assert (await client.delete("/v1/documents/notes.md", headers=bob)).status_code == 404

        # A RAG job of alice's finds the PDF's text, through the worker's retriever.
        llm.default = Reply(tokens=("Oil", "."))
        req = request("When does the Ostrin pump need oil?", userId="doc-alice", mode="rag")
        async with worker_running(config):
            produce(config, req)
            events = await events_of(rds, config, req["jobId"])
        top = [e["data"] for e in events if e["event"] == "retrieval"][-1]["hits"][0]
        assert top["source"] == "manual.pdf" and "Ostrin pump" in top["snippet"]

        changed = await client.put("/v1/documents/notes.md",
                                   content=b"# Boat\nThe boat moved to pier two.\n",
                                   headers=alice)
        assert changed.status_code == 200 and changed.json()["changed"] == 1
        deleted = await client.delete("/v1/documents/notes.md", headers=alice)
        assert deleted.json() == {"name": "notes.md", "deleted": 1}
        assert (await client.delete("/v1/documents/notes.md", headers=alice)).status_code == 404
        listed = (await client.get("/v1/documents", headers=alice)).json()
        assert [d["name"] for d in listed["documents"]] == ["manual.pdf"]


async def test_hostile_uploads_are_refused_by_name_and_the_gateway_goes_on(docs_config):
    config = docs_config(CHAT_ACTORS__RAG__MAX_DOCUMENT_BYTES="2048",
                         CHAT_ACTORS__RAG__MAX_DOCUMENTS="2")
    user = bearer("doc-mallory")
    cases = [
        ("%2Ehidden.md", b"text", 400, "not start with a dot"),
        ("a%01b.md", b"text", 400, "control character"),
        ("%20lead.md", b"text", 400, "space"),
        ("x" * 201 + ".md", b"text", 400, "1-200 characters"),
        ("tool.exe", b"MZ\x90\x00", 415, "only .txt, .md, .markdown, .pdf"),
        ("noext", b"text", 415, "only .txt"),
        ("empty.md", b"", 400, "empty"),
        ("big.md", b"a" * 2049, 413, "the limit"),
        ("fake.pdf", b"just text", 415, "not a PDF"),
        ("hidden.md", pdf_with("inside"), 415, "name it .pdf"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), 415, "not UTF-8"),
        ("nul.txt", b"abc\x00def", 415, "NUL"),
        ("broken.pdf", b"%PDF-1.4\n1 0 obj garbage", 422, "not a readable PDF"),
        ("blank.pdf", pdf_with(None), 422, "scanned PDF"),
        ("spaces.md", b" \n\t\n", 422, "no text"),
    ]
    async with gateway_running(config) as (_, client):
        for name, body, status, words in cases:
            answer = await client.put(f"/v1/documents/{name}", content=body, headers=user)
            assert answer.status_code == status, (name, answer.text)
            assert words in answer.json()["error"]["message"], (name, answer.text)
        assert (await client.put("/v1/documents/a.md", content=b"# A\nAlpha.\n",
                                 headers=user)).status_code == 201
        assert (await client.put("/v1/documents/b.md", content=b"# B\nBeta.\n",
                                 headers=user)).status_code == 201
        third = await client.put("/v1/documents/c.md", content=b"# C\nGamma.\n", headers=user)
        assert third.status_code == 409 and "limit" in third.json()["error"]["message"]
        # Replacing one within the count is fine; nothing refused was stored.
        assert (await client.put("/v1/documents/a.md", content=b"# A\nAlpha two.\n",
                                 headers=user)).status_code == 200
        listed = (await client.get("/v1/documents", headers=user)).json()["documents"]
        assert [d["name"] for d in listed] == ["a.md", "b.md"]
        unauthorised = await client.put("/v1/documents/a.md", content=b"x")
        assert unauthorised.status_code == 401


async def test_ingestion_never_holds_the_event_loop(docs_config, monkeypatch):
    import actors.adapters.rag.uploads as uploads

    inside, release = threading.Event(), threading.Event()
    real_apply = uploads.apply

    def slow_apply(*args, **kwargs):
        inside.set()
        assert release.wait(30)
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(uploads, "apply", slow_apply)
    config = docs_config()
    user = bearer("doc-patient")
    answers: list[int] = []
    async with gateway_running(config) as (_, client), trio.open_nursery() as nursery:
        async def upload() -> None:
            answer = await client.put("/v1/documents/slow.md", content=b"# Slow\nText.\n",
                                      headers=user)
            answers.append(answer.status_code)

        nursery.start_soon(upload)
        await trio.to_thread.run_sync(partial(inside.wait, 30))
        # The ingestion is held inside its thread: the gateway still answers.
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/v1/documents", headers=user)).status_code == 200
        assert answers == []
        release.set()
    assert answers == [201]


async def test_a_users_pdf_held_in_its_reader_never_holds_another_users_upload(docs_config,
                                                                              held):
    # Ann's PDF is in its reader, held by the test; her second upload waits behind it
    # (one turn per user). Ben's upload, sent after both, is answered meanwhile.
    config = docs_config()
    manual = pdf_with("The Ostrin pump needs oil every spring.")
    answers: dict[str, httpx.Response] = {}
    with trio.fail_after(60):
        async with (gateway_running(config, pdf_reader=held.command) as (handle, client),
                    trio.open_nursery() as nursery):
            nursery.start_soon(put_into, answers, client, "doc-ann", "manual.pdf", manual)
            reading = await held.next()
            assert reading.sha == sha(manual)
            nursery.start_soon(put_into, answers, client, "doc-ann", "second.md",
                               b"# Second\nAnn's second document.\n")
            await until(lambda: handle.gateway.documents.waiting() == 1)

            with trio.fail_after(20):
                ben = await client.put("/v1/documents/ben.md", content=b"# Ben\nBen's notes.\n",
                                       headers=bearer("doc-ben"))
            assert ben.status_code == 201, ben.text
            assert await names_of(client, "doc-ben") == ["ben.md"]
            assert answers == {}  # Ann's first is still held, her second behind it
            await reading.release()
    assert {name: a.status_code for name, a in answers.items()} == {
        "manual.pdf": 201, "second.md": 201}


async def test_turns_go_round_robin_over_users(docs_config, held):
    # One worker. Ann's first PDF is being read; her second and third wait, then Ben's
    # one. Once hers ends, Ben's goes next, not her second: her queue costs him at most
    # the turn that was running.
    config = docs_config(CHAT_ACTORS__RAG__UPLOAD_WORKERS="1")
    pdfs = {label: pdf_with(f"Document {label} of the series.")
            for label in ("ann-1", "ann-2", "ann-3", "ben-1")}
    label_of = {sha(body): label for label, body in pdfs.items()}
    answers: dict[str, httpx.Response] = {}
    with trio.fail_after(90):
        async with (gateway_running(config, pdf_reader=held.command) as (handle, client),
                    trio.open_nursery() as nursery):
            def send(label: str) -> None:
                nursery.start_soon(put_into, answers, client, f"doc-{label[:3]}",
                                   f"{label}.pdf", pdfs[label])

            send("ann-1")
            reading = await held.next()
            for waiting, label in enumerate(("ann-2", "ann-3", "ben-1"), start=1):
                send(label)
                await until(lambda n=waiting: handle.gateway.documents.waiting() == n)
            order = [label_of[reading.sha]]
            for _ in range(3):
                await reading.release()
                reading = await held.next()
                order.append(label_of[reading.sha])
            await reading.release()
    assert order == ["ann-1", "ben-1", "ann-2", "ann-3"]
    assert sorted((n, a.status_code) for n, a in answers.items()) == [
        ("ann-1.pdf", 201), ("ann-2.pdf", 201), ("ann-3.pdf", 201), ("ben-1.pdf", 201)]


async def test_an_upload_that_waits_past_upload_queue_s_is_503_and_nothing_of_it_is_stored(
        docs_config, held):
    config = docs_config(CHAT_ACTORS__RAG__UPLOAD_WORKERS="1",
                         CHAT_ACTORS__RAG__UPLOAD_QUEUE_S="1")
    manual = pdf_with("The Ostrin pump needs oil every spring.")
    answers: dict[str, httpx.Response] = {}
    with trio.fail_after(60):
        async with gateway_running(config, pdf_reader=held.command) as (_, client):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(put_into, answers, client, "doc-ann", "manual.pdf", manual)
                reading = await held.next()
                busy = await client.put("/v1/documents/ben.md", content=b"# Ben\nBen's notes.\n",
                                        headers=bearer("doc-ben"))
                assert busy.status_code == 503, busy.text
                assert busy.headers["retry-after"] == "1"
                assert "rag.upload_queue_s" in busy.json()["error"]["message"]
                assert await names_of(client, "doc-ben") == []
                assert answers == {}  # refused while the one worker was still taken
                await reading.release()
            assert answers["manual.pdf"].status_code == 201
            again = await client.put("/v1/documents/ben.md", content=b"# Ben\nBen's notes.\n",
                                     headers=bearer("doc-ben"))
            assert again.status_code == 201, again.text


async def test_a_user_holds_at_most_max_uploads_per_user_open_and_others_are_not_held(
        docs_config, held):
    # One worker, held by ann's first PDF; her second waits its turn (holding its body).
    # Her third is refused before its body is read; ben's upload still takes its turn.
    config = docs_config(CHAT_ACTORS__RAG__UPLOAD_WORKERS="1",
                         CHAT_ACTORS__RAG__MAX_UPLOADS_PER_USER="2")
    answers: dict[str, httpx.Response] = {}
    with trio.fail_after(60):
        async with gateway_running(config, pdf_reader=held.command) as (handle, client):
            documents = handle.gateway.documents
            async with trio.open_nursery() as nursery:
                nursery.start_soon(put_into, answers, client, "doc-ann", "one.pdf",
                                   pdf_with("The first manual."))
                reading = await held.next()
                nursery.start_soon(put_into, answers, client, "doc-ann", "two.md",
                                   b"# Two\nThe second note.\n")
                nursery.start_soon(put_into, answers, client, "doc-ben", "ben.md",
                                   b"# Ben\nBen's notes.\n")
                await until(lambda: documents.waiting() == 2)  # both in line for the worker
                third = await client.put("/v1/documents/three.md", content=b"# Three\n",
                                         headers=bearer("doc-ann"))
                assert third.status_code == 429, third.text
                assert "rag.max_uploads_per_user" in third.json()["error"]["message"]
                assert third.headers["retry-after"]
                assert answers == {}
                await reading.release()
            assert {name: a.status_code for name, a in answers.items()} == {
                "one.pdf": 201, "two.md": 201, "ben.md": 201}
            assert sorted(await names_of(client, "doc-ann")) == ["one.pdf", "two.md"]
            later = await client.put("/v1/documents/three.md", content=b"# Three\nLater.\n",
                                     headers=bearer("doc-ann"))
            assert later.status_code == 201, later.text


async def test_pdf_bombs_are_refused_by_the_limit_they_pass_and_nothing_is_stored(docs_config):
    # 2,000 pages sharing one 1 MB content stream, in ~320 KB: refused on its page count,
    # before a page is read. 300 pages within the page limit whose text passes
    # rag.max_document_bytes: reading stops at the page that passes it.
    config = docs_config(CHAT_ACTORS__RAG__MAX_DOCUMENT_BYTES="409600")
    line = "Lorem ipsum dolor sit amet " * 3
    pages_bomb = pdf_pages(2000, shown(line, 1_000_000 // (len(line) + 30)))
    text_bomb = pdf_pages(300, shown(line, 50))
    assert len(pages_bomb) < 400_000 and len(text_bomb) < 100_000
    user = bearer("doc-mallory")
    async with gateway_running(config) as (_, client):
        started = time.monotonic()
        with trio.fail_after(30):
            pages = await client.put("/v1/documents/pages.pdf", content=pages_bomb, headers=user)
        print(f"2,000-page bomb refused in {time.monotonic() - started:.2f} s")
        assert pages.status_code == 413, pages.text
        assert ("the PDF has 2000 pages; at most 1000 are read (rag.max_pdf_pages)"
                in pages.json()["error"]["message"])
        with trio.fail_after(30):
            text = await client.put("/v1/documents/text.pdf", content=text_bomb, headers=user)
        assert text.status_code == 413, text.text
        assert "its text passes 409600 bytes by page" in text.json()["error"]["message"]
        assert "(rag.max_document_bytes)" in text.json()["error"]["message"]
        assert await names_of(client, "doc-mallory") == []


async def test_a_pdf_reader_past_extract_timeout_s_is_killed_and_refused_while_others_go_on(
        docs_config, held):
    config = docs_config(CHAT_ACTORS__RAG__EXTRACT_TIMEOUT_S="10")
    manual = pdf_with("The Ostrin pump needs oil every spring.")
    answers: dict[str, httpx.Response] = {}
    with trio.fail_after(60):
        async with gateway_running(config, pdf_reader=held.command) as (_, client):
            async with trio.open_nursery() as nursery:
                # The embedding model loads on the first upload: before the clock starts.
                await put_into(answers, client, "doc-ben", "first.md", b"# First\nBen's 1st.\n")
                nursery.start_soon(put_into, answers, client, "doc-ann", "manual.pdf", manual)
                reading = await held.next()  # and never released
                await put_into(answers, client, "doc-ben", "second.md", b"# Second\nBen's 2nd.\n")
                assert answers["second.md"].status_code == 201
                assert "manual.pdf" not in answers  # still in its reader
            refused = answers["manual.pdf"]
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["message"] == (
                "manual.pdf: reading it took longer than 10 s, the limit (rag.extract_timeout_s)")
            with pytest.raises(ProcessLookupError):
                os.kill(reading.pid, 0)  # killed, and waited for
            assert await names_of(client, "doc-ann") == []


async def test_cli_ingest_into_a_users_collection_never_touches_their_uploads(docs_config,
                                                                              tmp_path):
    config = docs_config()
    collection = "user-doc-dora"
    folder = tmp_path / "cli"
    folder.mkdir()
    (folder / "a.md").write_text("# A\nThe operator's first document.\n")
    (folder / "b.md").write_text("# B\nThe operator's second document.\n")
    upload = b"# Notes\nDora's own notes: the boat is at pier nine.\n"
    dora = bearer("doc-dora")
    store = DocumentStore.from_config(config)

    def run(*paths: Path) -> Any:
        return ingest(store, config, collection, list(paths), root=tmp_path)

    try:
        async with gateway_running(config) as (_, client):
            assert (await client.put("/v1/documents/notes.md", content=upload,
                                     headers=dora)).status_code == 201
            await trio.to_thread.run_sync(run, folder)
            assert await names_of(client, "doc-dora") == ["cli/a.md", "cli/b.md", "notes.md"]

            # b.md is still on disk but not in this run's paths: the CLI's own is deleted.
            again = await trio.to_thread.run_sync(run, folder / "a.md")
            assert again.deleted == ["cli/b.md#0"] and again.kept_uploads == ["notes.md"]
            assert await names_of(client, "doc-dora") == ["cli/a.md", "notes.md"]

            # A file named like the upload: refused, naming both; nothing changes.
            before = (await client.get("/v1/documents", headers=dora)).json()["documents"]
            (tmp_path / "notes.md").write_text("# Notes\nThe operator's notes.\n")
            with pytest.raises(PermanentError) as refused:
                await trio.to_thread.run_sync(run, tmp_path / "notes.md", folder / "a.md")
            assert str(refused.value) == (
                f"{tmp_path / 'notes.md'}: {collection} has a document 'notes.md' uploaded "
                "through the gateway, and `ingest` never replaces an upload: rename the file "
                "or leave it out")
            assert (await client.get("/v1/documents", headers=dora)).json()["documents"] == before
    finally:
        store.close()
