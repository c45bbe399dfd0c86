"""A Chroma HTTP client whose requests end.

chromadb's own HTTP client waits without a limit (httpx, `timeout=None`), and
its constructor already talks to the server: a Chroma server that accepts
connections but never answers would hold `ingest` forever, and a worker thread
with it. So the server is first asked for its heartbeat within the timeout,
and the client's session then gets the same timeout for every request.
Imported only when a Chroma server is configured.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import chromadb
import httpx
from chromadb.config import Settings


def connect(url: str, timeout_s: float) -> Any:
    """A client of the Chroma server at `url` (http or https) whose every request ends
    within `timeout_s` (connecting, sending, each wait for bytes). Raises httpx's
    TransportError when the server does not answer its heartbeat in that time."""
    limit = httpx.Timeout(timeout_s)
    httpx.get(f"{url.rstrip('/')}/api/v2/heartbeat", timeout=limit)  # any reply will do
    parts = urlsplit(url)
    https = parts.scheme == "https"
    client: Any = chromadb.HttpClient(host=parts.hostname or "", ssl=https,
                                 port=parts.port or (443 if https else 8000),
                                 settings=Settings(anonymized_telemetry=False))
    # chromadb 1.5 keeps its httpx session here; pinned, and tests/test_rag.py's
    # silent-server test fails if it moves.
    client._server._session.timeout = limit
    return client
