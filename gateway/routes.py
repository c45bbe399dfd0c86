"""The gateway's ASGI app (docs/contract.md 7): the native routes (gateway.app), OpenAI's
(gateway.completions), and at the entrance a body declared too large refused before
anything reads it, and CORS for the origins `gateway.cors_origins` lists.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from config import Config
from gateway.app import (
    RAW_SEND,
    UPLOADS,
    Gateway,
    Handler,
    cancel,
    chat,
    dev_token,
    documents,
    error_response,
    events,
    guarded,
    healthz,
    metrics,
    page,
    readyz,
    session,
    sessions,
)
from gateway.completions import chat_completions, list_models, openai_shaped

# CORS: what a listed origin's browser may send and read (the SDKs add X-Stainless-*).
ALLOWED_HEADERS = frozenset({"authorization", "content-type", "idempotency-key",
                             "last-event-id", "traceparent", "openai-organization",
                             "openai-project", "openai-beta"})
STAINLESS = "x-stainless-"
EXPOSED = b"retry-after, retry-after-ms, x-request-id, x-should-retry"
METHODS = b"GET, POST, PUT, DELETE, OPTIONS"
PREFLIGHT_MAX_AGE = b"600"

App = Callable[[Any, Any, Any], Awaitable[None]]


def build_app(gateway: Gateway) -> App:
    """Every /v1 route guarded (the token, then the handler), behind the entrance."""

    def v1(path: str, route: str, handler: Handler, methods: list[str]) -> Route:
        return Route(path, partial(guarded, gateway, route, handler), methods=methods)

    def openai(path: str, route: str, handler: Handler, methods: list[str]) -> Route:
        return Route(path, partial(guarded, gateway, route, handler, shape=openai_shaped),
                     methods=methods)

    routes = [
        v1("/v1/chat", "chat", chat, ["POST"]),
        v1("/v1/jobs/{job_id}/events", "events", events, ["GET"]),
        v1("/v1/jobs/{job_id}/cancel", "cancel", cancel, ["POST"]),
        v1("/v1/sessions", "sessions", sessions, ["GET"]),
        v1("/v1/sessions/{session_id}/messages", "messages", session, ["GET"]),
        v1("/v1/sessions/{session_id}", "delete", session, ["DELETE"]),
        v1("/v1/documents", "documents", documents, ["GET"]),
        v1("/v1/documents/{name}", "documents", documents, ["PUT", "DELETE"]),
        openai("/v1/models", "models", list_models, ["GET"]),
        openai("/v1/chat/completions", "chat_completions", chat_completions, ["POST"]),
        Route("/healthz", healthz), Route("/readyz", partial(readyz, gateway)),
        Route("/metrics", partial(metrics, gateway)),
    ]
    if gateway.config.gateway.dev_signin:
        routes.append(Route("/v1/dev/token", partial(dev_token, gateway), methods=["POST"]))
    if gateway.config.gateway.page:
        routes.append(Route("/", page))
    return partial(_entrance, gateway.config, Starlette(routes=routes))


async def _entrance(config: Config, starlette: Starlette, scope: Any, receive: Any,
                    send: Any) -> None:
    """Every request: the raw `send` kept for EventStream, CORS for a listed origin,
    and a body declared too large refused before routing, authentication or a byte
    of it is read."""
    scope[RAW_SEND] = send
    if scope["type"] != "http":
        await starlette(scope, receive, send)
        return
    origin = _listed_origin(scope, config)
    if origin is not None:
        if scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method"):
            await _preflight(scope, origin)(scope, receive, send)
            return
        send = partial(_with_cors, origin, send)
    if refused := _declared_too_large(scope, config):
        await refused(scope, receive, send)
        return
    await starlette(scope, receive, send)


def _header(scope: Any, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


def _listed_origin(scope: Any, config: Config) -> bytes | None:
    """The request's Origin when `gateway.cors_origins` lists it (or "*")."""
    origins = config.gateway.cors_origins
    origin = _header(scope, b"origin") if origins else None
    if origin is None:
        return None
    if "*" in origins or origin.decode("latin-1") in origins:
        return origin
    return None


def _preflight(scope: Any, origin: bytes) -> Response:
    """The answer to a listed origin's preflight: the headers it asked for when each is
    one we take, else none (the browser then refuses the call and says why)."""
    asked = (_header(scope, b"access-control-request-headers") or b"").decode("latin-1")
    names = [n.strip().lower() for n in asked.split(",") if n.strip()]
    allowed = all(n in ALLOWED_HEADERS or n.startswith(STAINLESS) for n in names)
    response = Response(status_code=204)
    response.headers["access-control-allow-origin"] = origin.decode("latin-1")
    response.headers["access-control-allow-methods"] = METHODS.decode()
    if allowed and names:
        response.headers["access-control-allow-headers"] = ", ".join(names)
    response.headers["access-control-max-age"] = PREFLIGHT_MAX_AGE.decode()
    response.headers["vary"] = "Origin, Access-Control-Request-Headers"
    return response


async def _with_cors(origin: bytes, send: Any, message: Any) -> None:
    if message["type"] == "http.response.start":
        message = {**message, "headers": [
            *message.get("headers", ()), (b"access-control-allow-origin", origin),
            (b"access-control-expose-headers", EXPOSED), (b"vary", b"Origin")]}
    await send(message)


def _declared_too_large(scope: Any, config: Config) -> Response | None:
    """413 for a request whose Content-Length is over `gateway.max_body_bytes`, on every
    route but uploads (their handler holds them to `rag.max_document_bytes`)."""
    if str(scope.get("path", "")).startswith(UPLOADS):
        return None
    limit = config.gateway.max_body_bytes
    value = _header(scope, b"content-length")
    if value is not None and value.isdigit() and int(value) > limit:
        return error_response(413, f"the body is {int(value)} bytes; the limit is {limit} "
                           "(gateway.max_body_bytes)")
    return None
