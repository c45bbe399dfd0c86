"""Small PDFs written by hand for the upload tests and the hostile-client run: a page
showing a text, and many pages sharing one content stream (a PDF bomb)."""

from __future__ import annotations

import zlib


def pdf_with(text: str | None) -> bytes:
    """A one-page PDF showing `text` in Helvetica (None: a page with no text at all)."""
    stream = (f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET" if text is not None else "").encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    return pdf_of(objects)


def pdf_of(objects: list[bytes]) -> bytes:
    """A PDF of `objects` (numbered from 1, the first the catalog), with its xref."""
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


def pdf_pages(pages: int, content: bytes) -> bytes:
    """A PDF of `pages` pages that all show one (compressed) content stream: a few
    hundred bytes a page, however long the stream."""
    stream = zlib.compress(content, 9)
    kids = b" ".join(b"%d 0 R" % (5 + n) for n in range(pages))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
               b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream"
               % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    objects += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R "
                b"/Resources << /Font << /F1 4 0 R >> >> >>"] * pages
    return pdf_of(objects)


def shown(text: str, times: int) -> bytes:
    """A content stream showing `text` `times` times."""
    return f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET\n".encode() * times
