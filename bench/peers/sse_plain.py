"""The gateway's plain peer: the SSE relay most teams would write first, for `bench gateway`.

It serves the one route the benchmark loads, GET /v1/jobs/<id>/events, on the same contract
as our gateway (docs/contract.md 7): a Bearer JWT (HS256, `exp` required), the job's owner
key in Redis, `Last-Event-ID` resume, each stream entry relayed as an SSE event with the
entry id and its data with attempt and seq, the response ending after `done`. How is what
makes it the plain peer, each choice the usual one, written competently:

- Starlette with sse-starlette's `EventSourceResponse` (a ping every 15 s), under uvicorn
  with its defaults (uvloop and httptools when installed, as here).
- redis.asyncio, and each client's generator waits in its own `XREAD BLOCK` on its own
  stream: one Redis connection per open stream (the pool raised from 100 to fit).

    python -m bench.peers.sse_plain --redis redis://127.0.0.1:6379/0 --port 8090

The secret is read from $CHAT_ACTORS_JWT_SECRET, as the gateway reads it.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import jwt
import redis.asyncio as aioredis
import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

OWNER_PREFIX = "chat-actors:gateway:owner:"  # the gateway's owner keys, set by the bench
BLOCK_MS = 15000


def build_app(redis_url: str, secret: str) -> Starlette:
    # redis-py pools hold 100 connections by default, each open stream holds one here;
    # and its socket timeout (5 s) must outlast the XREAD's BLOCK.
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, max_connections=100_000,
                                     socket_timeout=BLOCK_MS / 1000 + 10)

    async def events(request: Request) -> Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        try:
            claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp"]})
        except jwt.PyJWTError:
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        job_id = request.path_params["job_id"]
        if await client.get(OWNER_PREFIX + job_id) != claims.get("sub"):
            return JSONResponse({"error": "no such job"}, status_code=404)
        stream = f"sse:chat:{job_id}"
        last = request.headers.get("last-event-id", "0-0")

        async def relay() -> AsyncIterator[dict[str, Any]]:
            after = last
            while True:
                for _, entries in await client.xread({stream: after}, count=256, block=BLOCK_MS) or ():
                    for entry_id, fields in entries:
                        after = entry_id
                        data = json.loads(fields.get("data", "{}"))
                        data["attempt"] = int(fields.get("attempt", 0))
                        data["seq"] = int(fields.get("seq", 0))
                        yield {"id": entry_id, "event": fields.get("event", "message"),
                               "data": json.dumps(data, separators=(",", ":"))}
                        if fields.get("event") == "done":
                            return

        return EventSourceResponse(relay(), ping=15)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/jobs/{job_id}/events", events),
                             Route("/healthz", healthz)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = build_app(args.redis, os.environ["CHAT_ACTORS_JWT_SECRET"])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
