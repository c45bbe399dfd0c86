"""What the hostile users send (issue 35): built here, small on the wire, costly to a
server that trusts them. No I/O.

- `FORGED_IDS`: `Last-Event-ID`s a user puts on their own job: above 2^64 though they
  match a 20-digit pattern, negative, 10 KB long.
- `schema_bomb(levels)`: a JSON Schema whose `$defs` refer to the level below twice,
  so expanding its `$ref`s doubles per level; 19 levels are about 2 KB.
- `pdf_bomb(pages)`: a PDF whose pages all share one 1 MB content stream (deflated
  to a few KB): every page's text is read from the whole megabyte again.
"""

from __future__ import annotations

from typing import Any

from tests.pdfs import pdf_pages

FORGED_IDS = (
    "99999999999999999999-0",  # 20 digits, above 2^64 - 1
    "18446744073709551616-0",  # 2^64 exactly
    "0-18446744073709551616",
    "-1-0",
    "1-" + "9" * 10_240,  # 10 KB
)


def schema_bomb(levels: int) -> dict[str, Any]:
    """An object schema with `levels` levels of `$defs`, each naming the one below twice."""
    defs: dict[str, Any] = {"d0": {"type": "string"}}
    for level in range(1, levels + 1):
        below = {"$ref": f"#/$defs/d{level - 1}"}
        defs[f"d{level}"] = {"type": "object", "properties": {"a": below, "b": dict(below)}}
    return {"type": "object", "properties": {"q": {"$ref": f"#/$defs/d{levels}"}},
            "$defs": defs}


def schema_bomb_request(levels: int, marker: str, session_id: str, *, model: str,
                        in_response_format: bool) -> dict[str, Any]:
    """A v2 chat request carrying the bomb as a tool's parameters or as the response
    schema (both are passed on to the vendor library the same way)."""
    bomb = schema_bomb(levels)
    request: dict[str, Any] = {"v": 2, "sessionId": session_id, "model": model,
                               "message": f"look it up {marker}"}
    if in_response_format:
        request["responseFormat"] = {"type": "json_schema", "name": "answer", "schema": bomb}
    else:
        request["tools"] = [{"name": "lookup", "description": "look a thing up",
                             "parameters": bomb}]
    return request


def pdf_bomb(pages: int = 2000, stream_bytes: int = 1 << 20) -> bytes:
    """A valid PDF of `pages` pages, each drawing the same deflated content stream of
    about `stream_bytes` bytes: a few short strings per hundred bytes, so reading a
    page's text parses the whole stream and keeps a little of it."""
    line = "BT /F1 9 Tf 72 700 Td (ab) Tj ET\n"
    return pdf_pages(pages, line.encode() * (stream_bytes // len(line)))
