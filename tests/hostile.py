"""Hostile input, shared by the fuzz tests (tests/test_fuzz_input.py) and the hostile
chaos run (bench/chaos.py): what an attacker or a broken neighbour sends, built
from a good request."""

from __future__ import annotations

import json

# Each mutation breaks one rule of contract 2.1.
MUTATIONS = {
    "drop a required field": lambda d, v: {k: x for k, x in d.items() if k != v},
    "wrong type": lambda d, v: {**d, v: 12345},
    "bad id characters": lambda d, v: {**d, "jobId": d["jobId"] + " /?"},
    "id too long": lambda d, v: {**d, "userId": "u" * 129},
    "empty message": lambda d, v: {**d, "message": ""},
    "oversize message": lambda d, v: {**d, "message": "x" * 1001},
    "unknown model alias": lambda d, v: {**d, "model": "no-such-alias"},
    "temperature out of range": lambda d, v: {**d, "params": {"temperature": 9.5}},
    "negative timeout": lambda d, v: {**d, "timeoutS": -1},
    "unknown mode": lambda d, v: {**d, "mode": "chat"},
    # Images (v2): bytes that are not what the data URL says, a host not allowed.
    "image bytes that are not a PNG": lambda d, v: {**d, "v": 2, "attachments": [
        {"type": "image", "url": "data:image/png;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+"}]},
    "image URL of a host not allowed": lambda d, v: {**d, "v": 2, "attachments": [
        {"type": "image", "url": "https://169.254.169.254/latest/meta-data/"}]},
    "image without v2": lambda d, v: {**d, "attachments": [
        {"type": "image", "url": "https://images.example.com/a.png"}]},
}
REQUIRED = ["jobId", "userId", "sessionId", "message"]
MAX_REQUEST_BYTES = 65536


def _with_raw_field(good: dict, name: str, raw: bytes) -> bytes:
    """`good` as JSON with one more field whose value is `raw` (json.dumps would recurse)."""
    body = json.dumps(good).encode()
    return body[:-1] + b', "' + name.encode() + b'": ' + raw + b"}"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# Each builds a hostile value from a good request and a size drawn by hypothesis.
HOSTILE = {
    "nested deep in an unknown field": lambda d, n: _with_raw_field(d, "extra", nested(n)),
    "nested deep in rag.where": lambda d, n: _with_raw_field(
        d, "rag", b'{"where": {"a": ' + b'{"b": ' * n + b"1" + b"}" * n + b"}}"),
    "U+0000 in the message": lambda d, n: json.dumps({**d, "message": "a\x00b"}).encode(),
    "U+0000 in a stop string": lambda d, n: json.dumps(
        {**d, "params": {"stop": ["x", "\x00"]}}).encode(),
    "U+0000 in a rag.where key": lambda d, n: json.dumps(
        {**d, "rag": {"where": {"a\x00": 1}}}).encode(),
    "invalid UTF-8 inside the message": lambda d, n: json.dumps(d).encode().replace(
        b'"message": "', b'"message": "\xff\xfe', 1),
    "larger than limits.max_request_bytes": lambda d, n: _with_raw_field(
        d, "padding", json.dumps("p" * (MAX_REQUEST_BYTES + n)).encode()),
}

# Control messages of the same kinds (chat.control): each used to stop every worker.
HOSTILE_CONTROL = [
    b'{"type": "cancel", "jobId": "j", "userId": "u", "x": ' + nested(50_000) + b"}",
    b'{"type": "cancel", "jobId": "j\x00", "userId": "u"}',
    b'{"type": "cancel", "jobId": "j", "userId": "u", "reason": "\xff\xfe"}',
    b'{"type": "cancel", "jobId": "' + b"y" * 70_000 + b'", "userId": "u"}',  # > 64 KiB
    b'{"type": "cancel", "jobId": 5, "userId": ["u"]}',
    b'{"type": "cancel", "jobId": "../../etc/passwd", "userId": "u"}',
    b"not json at all", b"", b"[]", b"null",
]

# rag.where filters Chroma's grammar refuses.
BAD_FILTERS = [{"$bogus": 1}, {"a": {"$gt": "x"}}, {"a": 1, "b": 2}, {"$and": []},
               {"a": {"$in": [1, "x"]}}]


def hostile_requests(template: dict) -> list[bytes]:
    """One of each hostile shape and each mutation, and a RAG request per bad filter."""
    values = [build(template, 5_000) for build in HOSTILE.values()]
    values += [json.dumps(mutate(template, field)).encode()
               for mutate in MUTATIONS.values() for field in REQUIRED[:1]]
    values += [json.dumps({**template, "mode": "rag", "rag": {"where": where}}).encode()
               for where in BAD_FILTERS]
    return values


# A vendor answering with broken HTTP: each is a ProtocolError (transient), never a hang.
BROKEN_HTTP = {
    "negative chunk size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n-6\r\n",
    "doubled content-length": b"HTTP/1.1 200 OK\r\ncontent-length: 10, 10\r\n\r\n0123456789",
    "not HTTP": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "gzip unasked": b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 2\r\n\r\n\x1f\x8b",
    "switching protocols": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
    "endless headers": b"HTTP/1.1 200 OK\r\n" + b"x-filler: 0123456789abcdef\r\n" * 5000,
}
# ... and the same vendor closing mid-chunk (ConnectionLost, transient too).
CUT_MID_CHUNK = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked"
                 b"\r\n\r\n40\r\ndata: {\"choices\": [")
