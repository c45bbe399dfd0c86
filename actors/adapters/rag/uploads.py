"""Users' own documents, uploaded through the gateway: each one checked, read and
ingested within its budgets, so one user's document never holds another user's.

- The bytes are checked (name, kind, size) before anything waits or runs.
- At most `rag.upload_workers` uploads are read and ingested at once, all users
  together, taken round-robin from one queue per user (actors/fair_queue.py); one
  user's uploads run one at a time, so their writes to the collection stay in order.
  An upload whose turn has not come within `rag.upload_queue_s` is refused (503 with
  Retry-After), nothing of it stored.
- A PDF is read in a child process (pdf_child.py) with its address space bounded,
  stopping at `rag.max_pdf_pages` pages or once its text passes
  `rag.max_document_bytes`, and killed at `rag.extract_timeout_s`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import subprocess
import sys
from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from actors.adapters.rag import pdf_child
from actors.adapters.rag.documents import DocumentStore
from actors.adapters.rag.ingestion import UPLOAD, apply
from actors.errors import DocumentRefused
from actors.fair_queue import FairQueue, NoTurn
from config import Config, Rag, own_collection

log = logging.getLogger("chat_actors.uploads")

# The PDF reader child: this interpreter, isolated from the environment (-I), running
# pdf_child.py as a script. Tests hand UserDocuments another command that holds it.
PDF_READER = (sys.executable, "-I", str(Path(pdf_child.__file__)))
STDERR_LIMIT = 64 * 1024  # what is kept of the child's stderr (a refusal, a traceback)
DOCUMENT_SUFFIXES = (".txt", ".md", ".markdown", ".pdf")
_NAME = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,200}$")


def pdf_memory_bytes(rag: Rag) -> int:
    """The PDF reader's address-space bound: 1 GiB for the interpreter, pypdf and its
    decoded streams, and 16 times the largest document for the bytes, the text (a
    str of up to 4 bytes a character) and the joined copy."""
    return 2**30 + 16 * rag.max_document_bytes


def checked_upload(name: str, data: bytes, *, max_bytes: int) -> bool:
    """Whether the upload is a PDF, once its name, kind and size are fine; else
    DocumentRefused saying what is wrong. The kind is read from the bytes (a PDF's
    header) and must agree with the name."""
    if not _NAME.match(name) or name.startswith(".") or name != name.strip():
        raise DocumentRefused("the name must be 1-200 characters, with no slash, backslash "
                              "or control character, and not start with a dot or a space",
                              status=400)
    suffix = Path(name).suffix.lower()
    if suffix not in DOCUMENT_SUFFIXES:
        raise DocumentRefused(f"{name}: only {', '.join(DOCUMENT_SUFFIXES)} documents are "
                              "taken (text, Markdown, PDF)", status=415)
    if not data:
        raise DocumentRefused(f"{name}: the document is empty", status=400)
    if len(data) > max_bytes:
        raise DocumentRefused(f"{name}: {len(data)} bytes; the limit is {max_bytes} "
                              "(rag.max_document_bytes)", status=413)
    is_pdf = data[:1024].lstrip().startswith(b"%PDF-")
    if suffix == ".pdf" and not is_pdf:
        raise DocumentRefused(f"{name}: the bytes are not a PDF (no %PDF- header)", status=415)
    if suffix != ".pdf" and is_pdf:
        raise DocumentRefused(f"{name}: the bytes are a PDF; name it .pdf", status=415)
    return is_pdf


def plain_text(name: str, data: bytes) -> str:
    """A text or Markdown upload's text, or DocumentRefused."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentRefused(f"{name}: not UTF-8 text (byte {exc.start} is "
                              f"{data[exc.start]:#04x})", status=415) from None
    if "\x00" in text:
        raise DocumentRefused(f"{name}: not text (it holds NUL bytes)", status=415)
    return _readable(name, text)


def _readable(name: str, text: str) -> str:
    if not text.strip():
        raise DocumentRefused(f"{name}: no text could be read from it"
                              + (" (a scanned PDF has only images)"
                                 if name.lower().endswith(".pdf") else ""), status=422)
    return text


async def pdf_text_in_child(name: str, data: bytes, rag: Rag,
                            command: Sequence[str] = PDF_READER) -> str:
    """A PDF upload's text, read by a child process within the page, text, memory and
    time budgets; DocumentRefused naming the budget it went over."""
    argv = [*command, str(rag.max_pdf_pages), str(rag.max_document_bytes),
            str(pdf_memory_bytes(rag))]
    with trio.move_on_after(rag.extract_timeout_s) as deadline:
        status, out, err = await _run_child(argv, data, rag.max_document_bytes)
    if deadline.cancelled_caught:
        raise DocumentRefused(f"{name}: reading it took longer than "
                              f"{rag.extract_timeout_s:g} s, the limit (rag.extract_timeout_s)",
                              status=422)
    if len(out) > rag.max_document_bytes:
        raise DocumentRefused(f"{name}: its text passes {rag.max_document_bytes} bytes, the "
                              "limit (rag.max_document_bytes)", status=413)
    if status == 0:
        return _readable(name, out.decode("utf-8", "replace"))
    said = err.decode("utf-8", "replace").strip()
    kind, _, why = said.partition("\t")
    if status == pdf_child.REFUSED and kind in pdf_child.KINDS:
        raise DocumentRefused(f"{name}: {why[:500]}",
                              status=413 if kind in ("pages", "text") else 422)
    log.warning("the PDF reader stopped on %s with status %s: %s", name, status, said[-2000:])
    raise DocumentRefused(f"{name}: not a readable PDF (the reader stopped on it with status "
                          f"{status})", status=422)


async def _run_child(argv: list[str], stdin: bytes, out_limit: int) -> tuple[int, bytes, bytes]:
    """Run `argv` with `stdin`: its exit status, stdout (cut after `out_limit`, the child
    then killed) and stderr. Killed, and waited for, when cancelled."""
    process = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = bytearray(), bytearray()
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdin and process.stdout and process.stderr
            nursery.start_soon(_feed, process.stdin, stdin)
            nursery.start_soon(_collect, process, process.stdout, out, out_limit)
            nursery.start_soon(_collect, process, process.stderr, err, STDERR_LIMIT)
        return await process.wait(), bytes(out), bytes(err)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    await stream.aclose()


async def _feed(stream: trio.abc.SendStream, data: bytes) -> None:
    # A child that exits before reading everything (it crashed) closes the pipe: its
    # exit status says why, not this.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)
        await stream.aclose()


async def _collect(process: trio.Process, stream: trio.abc.ReceiveStream, into: bytearray,
                   limit: int) -> None:
    async for chunk in stream:
        into += chunk
        if len(into) > limit:  # the child keeps to the limit itself; this is the backstop
            process.kill()
            return


class UserDocuments:
    """Each user's own documents, in their own collection (`user-{id}`, the first the
    retriever searches for them). The event loop that calls never waits for a PDF, the
    model or a store: PDFs are read in a child process, the rest in worker threads."""

    def __init__(self, store: DocumentStore, config: Config, *,
                 pdf_reader: Sequence[str] = PDF_READER) -> None:
        self._store = store
        self._config = config
        self._pdf_reader = tuple(pdf_reader)
        self._turns = FairQueue(config.rag.upload_workers)

    def collection(self, user_id: str) -> str:
        return own_collection(user_id)

    def waiting(self) -> int:
        """Uploads and deletes waiting for their turn now, all users together."""
        return self._turns.waiting()

    def close(self) -> None:
        self._store.close()

    @contextlib.asynccontextmanager
    async def _turn(self, user_id: str) -> AsyncGenerator[None]:
        rag = self._config.rag
        try:
            async with self._turns.turn(user_id, rag.upload_queue_s):
                yield
        except NoTurn:
            raise DocumentRefused(
                f"busy: your upload waited {rag.upload_queue_s:g} s (rag.upload_queue_s) "
                "without a turn and was not taken; send it again",
                status=503, retry_after_s=max(1, math.ceil(rag.upload_queue_s))) from None

    async def list(self, user_id: str) -> list[dict[str, Any]]:
        chunks = await trio.to_thread.run_sync(self._store.chunks, self.collection(user_id),
                                               abandon_on_cancel=True)
        documents: dict[str, dict[str, Any]] = {}
        for chunk in chunks.values():
            entry = documents.setdefault(chunk.source, {"name": chunk.source, "chunks": 0,
                                                        "chars": 0, "embeddedAt": 0.0})
            entry["chunks"] += 1
            entry["chars"] += len(chunk.text)
            entry["embeddedAt"] = max(entry["embeddedAt"],
                                      float(chunk.metadata.get("embedded_at", 0)))
        for entry in documents.values():
            entry["embeddedAt"] = datetime.fromtimestamp(entry["embeddedAt"], UTC).isoformat()
        return sorted(documents.values(), key=lambda d: d["name"])

    async def put(self, user_id: str, name: str, data: bytes) -> tuple[bool, dict[str, Any]]:
        """Add or replace document `name`: whether it is new, and what changed."""
        rag = self._config.rag
        collection = self.collection(user_id)
        is_pdf = checked_upload(name, data, max_bytes=rag.max_document_bytes)

        def put(text: str | None) -> tuple[bool, dict[str, Any]]:
            text = plain_text(name, data) if text is None else text
            sources = {c.source for c in self._store.chunks(collection).values()}
            if name not in sources and len(sources) >= rag.max_documents:
                raise DocumentRefused(f"you have {len(sources)} documents, the limit: delete "
                                      "one before adding another", status=409)
            report = apply(self._store, self._config, collection, {name: text}, origin=UPLOAD)
            return name not in sources, {
                "name": name, "chunks": len(report.added) + len(report.changed)
                + report.unchanged, "added": len(report.added),
                "changed": len(report.changed), "unchanged": report.unchanged,
                "deleted": len(report.deleted)}

        async with self._turn(user_id):
            text = await pdf_text_in_child(name, data, rag, self._pdf_reader) if is_pdf else None
            return await trio.to_thread.run_sync(put, text)

    async def delete(self, user_id: str, name: str) -> int:
        """Delete document `name`; how many chunks went (0: there was no such document)."""
        async with self._turn(user_id):
            report = await trio.to_thread.run_sync(
                partial(apply, self._store, self._config, self.collection(user_id), {},
                        origin=UPLOAD, remove=lambda source: source == name))
        return len(report.deleted)
