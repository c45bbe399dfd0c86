"""Users' own documents through the gateway: upload, list, replace, delete, RAG over them,
hostile uploads, and ingestion off the event loop. Real stack, real Chroma (embedded)."""

from __future__ import annotations

import threading
from functools import partial

import pytest
import trio

from tests.helpers import events_of, gateway_running, produce, request, worker_running
from tests.scripted_llm import Reply
from tests.test_gateway import bearer


def pdf_with(text: str | None) -> bytes:
    """A one-page PDF showing `text` in Helvetica (None: a page with no text at all)."""
    stream = (f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET" if text is not None else "").encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (n, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


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
    import actors.adapters.ingestion as ingestion

    inside, release = threading.Event(), threading.Event()
    real_apply = ingestion.apply

    def slow_apply(*args, **kwargs):
        inside.set()
        assert release.wait(30)
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(ingestion, "apply", slow_apply)
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
