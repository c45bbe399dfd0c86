"""A PDF's text, read within a page and byte budget; also the child process the gateway
reads uploaded PDFs in (`python -I pdf_child.py MAX_PAGES MAX_BYTES MEMORY_BYTES`).

A PDF is a program more than a document: 2,000 pages can share one 1 MB content
stream in 320 KB of file, and each page then parses that megabyte again. So the
gateway never reads one in its own process: this file runs as a script (stdlib and
pypdf only, nothing of ours, so it starts in a fraction of a second), its address
space bounded, and the parent kills it at `rag.extract_timeout_s`.

The child reads the PDF on stdin. Exit 0: the text on stdout (UTF-8). Exit 3: a
refusal on stderr, `<kind>\\t<message>`, kind one of `pages`, `text`, `unreadable`,
`memory`. Anything else is a crash the parent reports as one.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

REFUSED = 3  # the child's exit status for a refusal it explains on stderr
KINDS = ("pages", "text", "unreadable", "memory")
T = TypeVar("T")


class PdfRefused(ValueError):
    """A PDF not read, and why; `kind` is one of KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def pdf_text(source: bytes | Path, *, max_pages: int, max_bytes: int | None = None) -> str:
    """The text of a PDF's pages (a file or its bytes). PdfRefused when it has more than
    `max_pages` pages (counted before any is read), when its text passes `max_bytes`
    (UTF-8; reading stops at the page that passes it), or when it cannot be read."""
    from pypdf import PdfReader

    reader = _pypdf(lambda: PdfReader(io.BytesIO(source) if isinstance(source, bytes)
                                      else source))
    # An encrypted file's count is only its /Count claim: the pages read stop there.
    count = _pypdf(lambda: len(reader.pages))
    if count > max_pages:
        raise PdfRefused("pages", f"the PDF has {count} pages; at most {max_pages} are read "
                                  "(rag.max_pdf_pages)")
    texts: list[str] = []
    size = 0
    for index in range(count):
        text = _pypdf(partial(_page_text, reader, index))
        size += len(text.encode("utf-8", "replace")) + 2
        if max_bytes is not None and size > max_bytes:
            raise PdfRefused("text", f"its text passes {max_bytes} bytes by page {index + 1}, "
                                     "the limit (rag.max_document_bytes)")
        texts.append(text)
    return "\n\n".join(texts)


def _page_text(reader: Any, index: int) -> str:
    return reader.pages[index].extract_text() or ""


def _pypdf(call: Callable[[], T]) -> T:
    """`call()`, with what pypdf raises on a broken file as PdfRefused."""
    from pypdf.errors import PyPdfError

    try:
        return call()
    except (PyPdfError, KeyError, TypeError, AttributeError, IndexError, RecursionError,
            AssertionError, ZeroDivisionError, ValueError) as exc:
        raise PdfRefused("unreadable", f"not a readable PDF: {type(exc).__name__}: {exc}"
                         ) from None


def main(argv: list[str]) -> int:
    max_pages, max_bytes, memory_bytes = (int(arg) for arg in argv[1:4])
    if memory_bytes:
        import resource

        # Set before anything is read: a PDF that needs more fails with MemoryError
        # here instead of growing until the machine's OOM killer picks a process.
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        text = pdf_text(sys.stdin.buffer.read(), max_pages=max_pages, max_bytes=max_bytes)
    except PdfRefused as exc:
        sys.stderr.write(f"{exc.kind}\t{exc}\n")
        return REFUSED
    except MemoryError:
        sys.stderr.write(f"memory\treading it needs more than {memory_bytes // 2**20} MiB of "
                         "memory, the PDF reader's bound\n")
        return REFUSED
    sys.stdout.buffer.write(text.encode("utf-8", "replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
