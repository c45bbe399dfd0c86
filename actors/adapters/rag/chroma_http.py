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

from actors.errors import PermanentError

TOKEN_HEADER = "X-Chroma-Token"


def connect(url: str, timeout_s: float, token: str | None = None) -> Any:
    """A client of the Chroma server at `url` (http or https) whose every request ends
    within `timeout_s` (connecting, sending, each wait for bytes), sending `token` as
    X-Chroma-Token when given. Raises httpx's TransportError when the server does not
    answer its heartbeat in that time."""
    limit = httpx.Timeout(timeout_s)
    headers = {TOKEN_HEADER: token} if token else {}
    # Any reply will do, but a refused token is said here, once, by name.
    beat = httpx.get(f"{url.rstrip('/')}/api/v2/heartbeat", timeout=limit, headers=headers)
    if beat.status_code in (401, 403):
        raise PermanentError(f"chroma at {url}: the server refused the token "
                             f"({beat.status_code}): check rag.chroma_token_env and its "
                             "variable", code="chroma_auth")
    parts = urlsplit(url)
    https = parts.scheme == "https"
    client: Any = chromadb.HttpClient(host=parts.hostname or "", ssl=https,
                                      port=parts.port or (443 if https else 8000),
                                      headers=headers,
                                      settings=Settings(anonymized_telemetry=False))
    # chromadb 1.5 keeps its httpx session here; pinned, and tests/test_rag.py's
    # silent-server test fails if it moves.
    client._server._session.timeout = limit
    return client


def close(client: Any) -> None:
    """Let go of the client: its shared Systems (chromadb keeps one per server address,
    and its admin client, which checked the tenant and database, has another) and
    their httpx sessions (as above), which stopping a System leaves open."""
    sessions = [client._server._session]
    admin = getattr(client, "_admin_client", None)
    if admin is not None:
        sessions.append(admin._server._session)
    client.close()
    for session in sessions:
        session.close()
