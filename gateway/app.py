"""The gateway's HTTP contract (docs/contract.md 7), as a Starlette app.

POST /v1/chat turns a body into a `chat.request`; GET /v1/jobs/<id>/events relays
the job's Redis stream as Server-Sent Events, resumable by `Last-Event-ID`; POST
/v1/jobs/<id>/cancel produces a cancel; /v1/sessions reads and deletes history.
Every /v1 call needs a Bearer JWT. Another user's job answers exactly as an unknown
one does (404).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from actors.errors import DocumentRefused, PermanentError, TransientError
from actors.health import Health
from actors.ports import Telemetry
from actors.telemetry import NoTelemetry, traceparent_of
from config import Config
from gateway.auth import Authenticator, Caller, Unauthorized
from gateway.http1 import DIRECT_WRITES, Written
from gateway.relay import AnyRelay, Subscription, entry_key
from messages.ports import U64_MAX, Entry, int_field, is_entry_id
from messages.wire import BadInput, check_shape, is_ident

log = logging.getLogger("chat_actors.gateway")

PAGE = Path(__file__).with_name("page.html")
RETRY_MS = 3000  # what a client waits before it reconnects
OWNER_PREFIX = "chat-actors:gateway:owner:"
IDEMPOTENCY_PREFIX = "chat-actors:gateway:idem:"
PENDING = "pending:"  # an Idempotency-Key's value while its request is being sent
WAIT_FIRST_S, WAIT_MOST_S = 0.2, 1.0  # a job nobody has started is looked up again after
SETTLE_POLL_S = 0.1  # how often a repeat looks whether the first request's fate is known
CALL_SESSION = "cc-"  # a Chat Completions call's own session: cc-<jobId>, never listed
UPLOADS = "/v1/documents/"  # the one route whose body is not JSON (rag.max_document_bytes)


def idempotency_key(user: str, key: str) -> str:
    """The Redis key of a user's Idempotency-Key. `/` is in neither id's charset, so no
    two (user, key) pairs share one (user `acme` with key `bob:k1` is not user
    `acme:bob` with key `k1`)."""
    return f"{IDEMPOTENCY_PREFIX}{user}/{key}"


def uuid7() -> str:
    """A UUIDv7: 48 bits of Unix milliseconds, then random bits (RFC 9562)."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(secrets.token_bytes(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant 10
    return str(uuid.UUID(int=value))


class Reads(Protocol):
    async def remember_owner(self, key: str, user_id: str, ttl_s: int) -> None: ...
    async def owner_key(self, key: str) -> str | None: ...
    async def first_user(self, stream: str, job_id: str) -> str | None: ...
    async def claim_once(self, key: str, value: str, ttl_s: int) -> str: ...
    async def settle(self, key: str, expected: str, value: str) -> None: ...
    async def after(self, stream: str, after_id: str, count: int) -> list[Entry]: ...
    async def last(self, stream: str) -> Entry | None: ...
    async def ping(self) -> None: ...


class History(Protocol):
    async def sessions(self, *, user_id: str, limit: int = 100) -> list[dict[str, Any]]: ...
    async def session_messages(self, *, user_id: str, session_id: str,
                               limit: int = 500) -> list[dict[str, Any]]: ...
    async def delete_session(self, *, user_id: str, session_id: str) -> int: ...
    async def fence_refused(self, *, job_id: str, user_id: str, session_id: str,
                            reason: str) -> bool: ...


class Documents(Protocol):
    """A user's own documents (actors/adapters/rag/uploads.py UserDocuments)."""

    async def list(self, user_id: str) -> list[dict[str, Any]]: ...
    async def put(self, user_id: str, name: str, data: bytes) -> tuple[bool, dict[str, Any]]: ...
    async def delete(self, user_id: str, name: str) -> int: ...


# (topic, value, key, headers)
Produce = Callable[[str, bytes, bytes | None, list[tuple[str, bytes]]], Awaitable[None]]


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter("chat_actors.gateway_requests", "HTTP requests by route and status.",
                                ["route", "status"], registry=self.registry)
        self.relayed = 0  # stream entries sent to clients (counted on the hot path as an int)
        self.registry.register(_Relayed(self))
        self.open_streams = Gauge("chat_actors.gateway_open_streams", "Event streams open now.",
                                  registry=self.registry)


class _Relayed:
    """chat_actors.gateway_events_relayed, read from GatewayMetrics.relayed when scraped
    (a Counter's inc, with its lock, cost more than the rest of an event's bookkeeping)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("chat_actors.gateway_events_relayed",
                                  "Stream entries sent to clients.", value=self._metrics.relayed)


@dataclass
class UserSlots:
    """What each user holds open at once in this process: event streams open or waiting
    for their job (gateway.max_streams_per_user; every stream and every wait costs
    Redis reads that all users share), uploads (rag.max_uploads_per_user; a waiting one
    holds its body). One user's burst is refused (429) instead of slowing the rest."""

    held: dict[str, int] = field(default_factory=dict[str, int])

    def take(self, user: str, most: int) -> bool:
        if self.held.get(user, 0) >= most:
            return False
        self.held[user] = self.held.get(user, 0) + 1
        return True

    def give_back(self, user: str) -> None:
        left = self.held[user] - 1
        if left:
            self.held[user] = left
        else:
            del self.held[user]  # users with no stream take no room


@dataclass
class Gateway:
    config: Config
    auth: Authenticator  # a JWT or an API key names the caller
    reads: Reads
    relay: AnyRelay
    history: History
    produce: Produce
    documents: Documents | None = None  # uploads; None: the routes answer 404
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    health: Health = field(default_factory=Health)  # /readyz: dependencies and draining
    telemetry: Telemetry = field(default_factory=NoTelemetry)
    stream_slots: UserSlots = field(default_factory=UserSlots)
    upload_slots: UserSlots = field(default_factory=UserSlots)  # rag.max_uploads_per_user

    def close(self) -> None:
        """Start draining: /readyz turns 503, and every open stream ends at once with a
        last `retry:` (the relay ends their subscriptions)."""
        self.health.draining = True
        self.relay.close()


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, **extra}}, status_code=status)


NOT_FOUND = "no such job"  # the same words for another user's job and an unknown one


async def _owner(gateway: Gateway, job_id: str) -> str | None:
    owner = await gateway.reads.owner_key(OWNER_PREFIX + job_id)
    if owner is None:
        owner = await gateway.reads.first_user(gateway.config.job_keys(job_id).stream, job_id)
    return owner


def too_many_streams(most: int, wait_s: float) -> JSONResponse:
    response = error_response(429, f"too many event streams: {most} open or waiting per user is "
                      "the limit (gateway.max_streams_per_user); close one first")
    # A waiting stream gives its slot back within stream_wait_s; an open one at its end.
    response.headers["retry-after"] = str(math.ceil(wait_s))
    return response


async def _open_events(gateway: Gateway, user: str, job_id: str,
                       resume: str | None) -> Response:
    """The job's event stream for its owner (404 for anyone else, as for an unknown job;
    204 for a resume at or after its `done`); a job not started yet is waited for."""
    config = gateway.config
    stream = config.job_keys(job_id).stream
    owner = await _owner(gateway, job_id)
    pause = WAIT_FIRST_S
    with trio.move_on_after(config.gateway.stream_wait_s):
        while owner is None:  # produced elsewhere, not started yet: wait briefly
            # Looked up less often the longer it waits: a crowd of waits for jobs that
            # never come (unknown ids) costs the shared Redis pool little.
            await trio.sleep(pause)
            pause = min(pause * 1.5, WAIT_MOST_S)
            owner = await _owner(gateway, job_id)
    if owner != user:
        return error_response(404, NOT_FOUND)
    if resume is not None:
        last = await gateway.reads.last(stream)
        if (last is not None and last[1].get("event") == "done"
                and last[1].get("jobId") == job_id
                and entry_key(last[0]) <= entry_key(resume)):
            return Response(status_code=204)
    return EventStream(partial(_relay, gateway, job_id, stream, resume or "0-0"))


class BodyRefused(Exception):
    """A body over its size or time budget: answered `status` with the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _body_within(request: Request, limit: int, timeout_s: float) -> bytes | None:
    """The request's body, or None once it is longer than `limit` (never read further);
    BodyRefused (408) when it has not all arrived within `timeout_s` (a client sending
    a few bytes a second holds nothing of the gateway's for longer)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    parts: list[bytes] = []
    size = 0
    with trio.move_on_after(timeout_s) as deadline:
        async with contextlib.aclosing(request.stream()) as stream:
            async for part in stream:
                size += len(part)
                if size > limit:
                    return None
                parts.append(part)
    if deadline.cancelled_caught:
        raise BodyRefused(408, f"the body did not arrive within {timeout_s:g}s "
                               "(gateway.body_timeout_s)")
    return b"".join(parts)


async def json_body(request: Request, config: Config) -> Any:
    """A JSON route's body, decoded: read up to `gateway.max_body_bytes` and no further,
    its nesting checked before a recursive decoder sees it. BadInput or BodyRefused
    say what is wrong. Every route taking JSON reads it here."""
    return (await json_body_sized(request, config))[0]


async def json_body_sized(request: Request, config: Config) -> tuple[Any, int]:
    """json_body, and the body's size in bytes."""
    limit = config.gateway.max_body_bytes
    body = await _body_within(request, limit, config.gateway.body_timeout_s)
    if body is None:
        raise BodyRefused(413, f"the body is over {limit} bytes, the limit "
                               "(gateway.max_body_bytes)")
    check_shape(body, limit)
    try:
        return json.loads(body), len(body)
    except ValueError as exc:  # UnicodeDecodeError included
        raise BadInput("$", f"the body is not JSON: {exc}") from None


RAW_SEND = "chat_actors.send"  # the server's own `send`, kept in the scope for EventStream

# A /v1 route's handler: the gateway, the request, and the caller its token names.
Handler = Callable[[Gateway, Request, Caller], Awaitable[Response]]


def _as_is(response: Response) -> Response:
    return response


async def guarded(gateway: Gateway, route: str, handler: Handler, request: Request, *,
                  shape: Callable[[Response], Response] = _as_is) -> Response:
    """A /v1 call: the token names the caller, then `handler` answers. What it raises is
    answered here with the status it means (an error body in the route's `shape`), and
    every answer is counted by route."""
    try:
        caller = await gateway.auth.identify(request.headers.get("authorization"))
        response = await handler(gateway, request, caller)
    except Unauthorized as exc:
        response = error_response(401, str(exc))
        response.headers["www-authenticate"] = 'Bearer error="invalid_token"'
    except BodyRefused as exc:
        response = error_response(exc.status, str(exc))
    except BadInput as exc:
        response = error_response(400, exc.rule, field=exc.field)
    except TransientError as exc:
        log.warning("%s: a dependency failed: %s", route, exc)
        response = error_response(503, "a dependency is unavailable; try again")
        response.headers["retry-after"] = "2"
    except PermanentError as exc:
        log.error("%s: %s", route, exc)
        response = error_response(500, "internal error")
    if response.status_code >= 400:
        response = shape(response)
    gateway.metrics.requests.labels(route=route, status=str(response.status_code)).inc()
    return response


async def chat(gateway: Gateway, request: Request, caller: Caller) -> Response:
    user = caller.user
    config = gateway.config
    body = await json_body(request, config)
    if not isinstance(body, dict):
        return error_response(400, "the body must be a JSON object", field="$")
    value = cast(dict[str, Any], body)
    for assigned in ("jobId", "userId", "apiKeyId"):
        if assigned in value:
            return error_response(400, "assigned by the gateway; leave it out",
                                  field=f"$.{assigned}")
    if str(value.get("sessionId", "")).startswith(CALL_SESSION):
        return error_response(400, f"session ids starting {CALL_SESSION} are the gateway's "
                              "(one per Chat Completions call)", field="$.sessionId")
    key = idempotency_header(request)
    if isinstance(key, Response):
        return key
    job_id = uuid7()
    fields: dict[str, Any] = {**value, "jobId": job_id, "userId": user}
    if caller.key_id is not None:  # recorded with the job: a contract v3 field
        fields |= {"apiKeyId": caller.key_id, "v": 3}
    raw = json.dumps(fields).encode()
    checked = config.decode_request(raw)
    sent = await submit(gateway, request, user, job_id, raw, checked.session_id, key)
    return sent if isinstance(sent, Response) else _accepted(sent)


def idempotency_header(request: Request) -> str | Response | None:
    """The request's Idempotency-Key (None without one), or the 400 answering a bad one."""
    key = request.headers.get("idempotency-key")
    if key is not None and not is_ident(key):
        return error_response(400, "Idempotency-Key: 1-128 characters of [A-Za-z0-9._:-]",
                      field="Idempotency-Key")
    return key


async def submit(gateway: Gateway, request: Request, user: str, job_id: str, raw: bytes,
                 session_id: str, key: str | None) -> str | Response:
    """Send a checked request to the workers: the id of the job that answers it (this
    one, or with an Idempotency-Key seen before the earlier one's), or the refusal."""
    config = gateway.config
    idem = idempotency_key(user, key) if key is not None else None
    if idem is not None:
        earlier = await _hold(gateway, idem, job_id, user, session_id)
        if earlier is not None:
            return earlier
    ttl = config.gateway.idempotency_s + config.stream.ttl_s
    await gateway.reads.remember_owner(OWNER_PREFIX + job_id, user, ttl)
    # The client's trace (a valid W3C traceparent; anything else is ignored) goes on
    # through Kafka to the worker; with telemetry on, under the gateway's own span.
    incoming = traceparent_of([("traceparent", request.headers.get("traceparent", "")
                                .encode("latin-1"))])
    topic = config.kafka.request_topic
    try:
        with gateway.telemetry.sending(topic, incoming) as traceparent:
            await gateway.produce(topic, raw, session_id.encode(),
                                  [("traceparent", traceparent.encode())] if traceparent
                                  else [])
    except TransientError as exc:
        return await _unconfirmed(gateway, job_id, user, session_id, idem, exc)
    if idem is not None:
        await gateway.reads.settle(idem, PENDING + job_id, job_id)
    return job_id


async def _hold(gateway: Gateway, idem: str, job_id: str, user: str,
                session_id: str) -> str | None:
    """Take the Idempotency-Key for this request (None), or answer a repeat: the
    first request's job once it was accepted. While the first is still being sent,
    wait for its fate (a refused first leaves the key to this one); one pending for
    longer than a send can take was left by a gateway that died mid-send: fence its
    job as a refused one would be, and take the key over unless a worker has it."""
    config = gateway.config
    waited = trio.current_time() + config.gateway.produce_timeout_s + 2.0
    while True:
        held = await gateway.reads.claim_once(idem, PENDING + job_id,
                                              config.gateway.idempotency_s)
        if held == PENDING + job_id:
            return None
        if not held.startswith(PENDING):
            return held
        if trio.current_time() > waited:
            earlier = held.removeprefix(PENDING)
            if not await gateway.history.fence_refused(
                    job_id=earlier, user_id=user, session_id=session_id,
                    reason="its gateway stopped while sending it"):
                await gateway.reads.settle(idem, held, earlier)
                return earlier
            await gateway.reads.settle(idem, held, "")
            waited = trio.current_time() + config.gateway.produce_timeout_s + 2.0
            continue
        await trio.sleep(SETTLE_POLL_S)


async def _unconfirmed(gateway: Gateway, job_id: str, user: str, session_id: str,
                       idem: str | None, exc: TransientError) -> str | Response:
    """The broker did not confirm the request: it may still reach a worker later.
    Fence it (a terminal row no worker runs) and answer 503, so a refusal is a
    refusal; a worker that claimed it first means it was accepted after all (202)."""
    try:
        fenced = await gateway.history.fence_refused(
            job_id=job_id, user_id=user, session_id=session_id, reason=str(exc)[:500])
    except TransientError as fence_failed:
        log.error("chat: job %s: the broker did not confirm it (%s) and it could not be "
                  "fenced (%s): it may still run", job_id, exc, fence_failed)
        if idem is not None:  # a retry with the key gets this job, not a second one
            await gateway.reads.settle(idem, PENDING + job_id, job_id)
        return error_response(504, "the request was sent but not confirmed, and may still run: "
                           "follow its events; a retry with the same Idempotency-Key "
                           "returns this job", jobId=job_id,
                      events=f"/v1/jobs/{job_id}/events")
    if idem is not None:
        await gateway.reads.settle(idem, PENDING + job_id, "" if fenced else job_id)
    if not fenced:
        return job_id
    log.warning("chat: job %s refused: the broker did not confirm it (%s); fenced, it "
                "never runs", job_id, exc)
    response = error_response(503, "the request was not accepted (the message broker did not "
                           "confirm it) and will not run: send it again", code="not_accepted")
    response.headers["retry-after"] = "2"
    return response


def _accepted(job_id: str) -> JSONResponse:
    return JSONResponse({"jobId": job_id, "events": f"/v1/jobs/{job_id}/events"},
                        status_code=202)


async def events(gateway: Gateway, request: Request, caller: Caller) -> Response:
    user = caller.user
    config = gateway.config
    job_id = request.path_params["job_id"]
    if not is_ident(job_id):
        return error_response(404, NOT_FOUND)
    resume = request.headers.get("last-event-id")
    if resume is not None and not is_entry_id(resume):
        return error_response(400, "Last-Event-ID must be a stream entry id: two integers "
                      f"0..{U64_MAX} joined by '-'", field="Last-Event-ID")
    most = config.gateway.max_streams_per_user
    if not gateway.stream_slots.take(user, most):
        return too_many_streams(most, config.gateway.stream_wait_s)
    release = partial(gateway.stream_slots.give_back, user)
    try:
        response = await _open_events(gateway, user, job_id, resume)
    except BaseException:
        release()
        raise
    if isinstance(response, EventStream):
        response.on_close = release  # the slot is held until the stream ends
    else:
        release()
    return response


async def cancel(gateway: Gateway, request: Request, caller: Caller) -> Response:
    user = caller.user
    job_id = request.path_params["job_id"]
    if not is_ident(job_id):
        return error_response(404, NOT_FOUND)
    if await _owner(gateway, job_id) != user:
        return error_response(404, NOT_FOUND)
    message = json.dumps({"type": "cancel", "jobId": job_id, "userId": user,
                          "reason": "cancelled through the gateway"}).encode()
    await gateway.produce(gateway.config.kafka.control_topic, message, job_id.encode(), [])
    return JSONResponse({"jobId": job_id, "cancel": "sent"}, status_code=202)


async def sessions(gateway: Gateway, request: Request, caller: Caller) -> Response:
    user = caller.user
    return JSONResponse({"sessions": await gateway.history.sessions(user_id=user)})


async def session(gateway: Gateway, request: Request, caller: Caller) -> Response:
    user = caller.user
    session_id = request.path_params["session_id"]
    if not is_ident(session_id):
        return error_response(404, "no such session")
    if request.method == "DELETE":
        gone = await gateway.history.delete_session(user_id=user, session_id=session_id)
        return JSONResponse({"sessionId": session_id, "deleted": gone})
    turns = await gateway.history.session_messages(user_id=user, session_id=session_id)
    return JSONResponse({"sessionId": session_id, "messages": turns})


async def documents(gateway: Gateway, request: Request, caller: Caller) -> Response:
    user = caller.user
    if gateway.documents is None:
        return error_response(404, "document uploads are not served here")
    rag = gateway.config.rag
    if request.method == "GET":
        return JSONResponse({"documents": await gateway.documents.list(user), "limits": {
            "maxDocumentBytes": rag.max_document_bytes, "maxDocuments": rag.max_documents}})
    name = request.path_params["name"]
    if not gateway.upload_slots.take(user, rag.max_uploads_per_user):
        busy = error_response(429, f"{rag.max_uploads_per_user} of your uploads are open already "
                           "(rag.max_uploads_per_user); wait for one to finish")
        busy.headers["retry-after"] = "2"
        return busy
    try:
        return await _document(gateway, gateway.documents, request, user, name)
    finally:
        gateway.upload_slots.give_back(user)


async def _document(gateway: Gateway, store: Documents, request: Request, user: str,
                    name: str) -> Response:
    """PUT (store the body as the user's document `name`) or DELETE it."""
    rag = gateway.config.rag
    try:
        if request.method == "DELETE":
            gone = await store.delete(user, name)
            if not gone:
                return error_response(404, f"no document {name!r}")
            return JSONResponse({"name": name, "deleted": gone})
        data = await _body_within(request, rag.max_document_bytes,
                                  gateway.config.gateway.body_timeout_s)
        if data is None:
            return error_response(413, f"{name}: over {rag.max_document_bytes} bytes, the limit "
                               "(rag.max_document_bytes)")
        created, summary = await store.put(user, name, data)
    except DocumentRefused as exc:
        refused = error_response(exc.status, str(exc))
        if exc.retry_after_s is not None:  # busy (503): nothing of it was stored
            refused.headers["retry-after"] = str(exc.retry_after_s)
        return refused
    return JSONResponse(summary, status_code=201 if created else 200)


async def dev_token(gateway: Gateway, request: Request) -> Response:
    try:
        value = await json_body(request, gateway.config)
    except BodyRefused as exc:
        return error_response(exc.status, str(exc))
    except BadInput:
        value = None
    match value:
        case {"user": str() as name} if 0 < len(name) <= 128:
            return JSONResponse({"token": gateway.auth.verifier.dev_token(name), "user": name})
        case _:
            return error_response(400, 'the body must be {"user": "<name>"}', field="$.user")


async def page(request: Request) -> Response:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"),
                        headers={"cache-control": "no-store",
                                 "content-security-policy": "default-src 'self'; "
                                 "script-src 'unsafe-inline'; style-src 'unsafe-inline'"})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(gateway: Gateway, request: Request) -> Response:
    health = gateway.health
    return JSONResponse(health.report(), status_code=200 if health.ready() else 503)


async def metrics(gateway: Gateway, request: Request) -> Response:
    gateway.metrics.open_streams.set(gateway.relay.open_streams())
    return Response(generate_latest(gateway.metrics.registry),
                    headers={"content-type": CONTENT_TYPE_LATEST})


def sse(entry: Entry, attempt: int, seq: int) -> bytes:
    """One stream entry as an SSE event: the entry id, the event, and its data with
    attempt and seq."""
    return _sse_text(entry[0], entry[1], attempt, seq).encode()


def _sse_text(entry_id: str, fields: Mapping[str, str], attempt: int, seq: int) -> str:
    event = fields.get("event", "message")
    if "\n" in event or "\r" in event:  # a damaged entry cannot add lines to the event
        event = "message"
    return (f"id: {entry_id}\nevent: {event}\ndata: "
            f"{_with_position(fields.get('data', '{}'), attempt, seq)}\n\n")


_ANY_JSON = msgspec.json.Decoder()


def _with_position(raw: str, attempt: int, seq: int) -> str:
    """The entry's JSON object with its attempt and seq. The worker's data is one line
    of compact JSON without those keys: it is checked, not decoded and encoded again
    (that was a fifth of the relay's time per event). Anything else (pretty-printed,
    not an object, holding the keys already, damaged) is rebuilt."""
    if (raw.startswith("{") and raw.endswith("}") and '"attempt"' not in raw
            and '"seq"' not in raw and "\n" not in raw and "\r" not in raw):
        try:
            decoded = _ANY_JSON.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            decoded = None
        if isinstance(decoded, dict) and "attempt" not in decoded and "seq" not in decoded:
            return f"{raw[:-1]}{',' if decoded else ''}\"attempt\":{attempt},\"seq\":{seq}}}"
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # damaged, or nested past Python's stack
        data = {}
    if not isinstance(data, dict):
        data = {"value": data}
    data["attempt"], data["seq"] = attempt, seq
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def stream_read_error(reason: str) -> bytes:
    """The last event of a response whose stream cannot be read (contract 7): the
    contract's `error` shape, without an `id` (it is no stream entry)."""
    data = {"code": "stream_read", "message": f"this job's events cannot be read: {reason}",
            "retryable": False}
    return f"event: error\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class DirectWrites(Protocol):
    """The server's side of an event stream's body (gateway.http1's connection)."""

    pending: bytearray

    def write_nowait(self, body: bytes) -> Written: ...
    async def flush(self) -> None: ...


@dataclass
class Body:
    """An event stream's body: `write` from its own task (it waits while the client's
    socket is full); `write_nowait` from any task, at once (the relay's reader writes
    the entries it read straight to each client's socket, without waking the client's
    task); `flush` what a write left pending."""

    send: Callable[[Any], Awaitable[None]]
    direct: DirectWrites

    async def write(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    def write_nowait(self, data: bytes) -> Written:
        return self.direct.write_nowait(data)

    @property
    def pending(self) -> bool:
        return bool(self.direct.pending)

    async def flush(self) -> None:
        await self.direct.flush()


class EventStream(Response):
    """`text/event-stream`, written by `run(body)` until it returns or the client goes
    (then `run` is cancelled, so what it holds is let go at once, not when a garbage
    collector finds an abandoned generator)."""

    def __init__(self, run: Callable[[Body], Awaitable[None]]) -> None:
        # No Content-Length (Response.__init__ would declare 0): the body streams.
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")]
        self.run = run
        self.on_close: Callable[[], None] | None = None  # called once, however it ended

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self._stream(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _stream(self, scope: Any, receive: Any, send: Any) -> None:
        direct = scope.get("extensions", {}).get(DIRECT_WRITES)
        if direct is None:
            raise RuntimeError("an event stream needs the gateway's own HTTP server "
                               "(gateway/http1.py): its body is written without waiting")
        await send({"type": "http.response.start", "status": 200,
                    "headers": self.raw_headers})
        # The body goes past Starlette's middleware (each layer wraps every send, a
        # quarter of a write's cost); the start went through it, so an error raised
        # after it is known to come after the response began.
        body = Body(scope.get(RAW_SEND, send), direct)
        async with trio.open_nursery() as nursery:
            async def hang_up() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(hang_up)
            await self.run(body)
            nursery.cancel_scope.cancel()
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


@dataclass
class _Follower:
    """What one client of a job's stream has been sent: the SSE bytes of new entries
    (this job's alone: a shared stream holds every job), each event once."""

    job_id: str
    sent: tuple[int, int] = (-1, -1)  # the (attempt, seq) of the last event sent
    done: bool = False

    def frame(self, entries: Sequence[Entry]) -> tuple[bytes, tuple[tuple[int, int], bool], int]:
        """The events of `entries` not sent yet; the position and `done` they reach,
        and how many there are. Nothing is kept until `commit`: a write the socket
        refuses leaves the follower where it was. (Every relayed event passes here.)"""
        sent, events, done, job_id = self.sent, list[str](), False, self.job_id
        for entry_id, fields in entries:
            if fields.get("jobId") != job_id:
                continue
            attempt, seq = int_field(fields, "attempt"), int_field(fields, "seq")
            if attempt is not None and seq is not None:
                if (attempt, seq) <= sent:
                    # Written again after a Redis failover lost its reply (the writer
                    # retried the batch on the new primary): the client has it.
                    continue
                sent = (attempt, seq)
            events.append(_sse_text(entry_id, fields, attempt or 0, seq or 0))
            if done := fields.get("event") == "done":
                break
        return "".join(events).encode(), (sent, done), len(events)

    def commit(self, reached: tuple[tuple[int, int], bool]) -> None:
        self.sent = reached[0]
        self.done = self.done or reached[1]


S = TypeVar("S")


class Follower(Protocol[S]):
    """What one client of a job's stream has been sent, in its own format: `frame` gives
    the bytes for new entries and the state they reach (S), `commit` keeps it once
    they were written; `done` once the job's end was sent."""

    @property
    def done(self) -> bool: ...
    def frame(self, entries: Sequence[Entry]) -> tuple[bytes, S, int]: ...
    def commit(self, reached: S) -> None: ...


async def _relay(gateway: Gateway, job_id: str, stream: str, after: str, body: Body) -> None:
    """The SSE body of contract 7: `retry:`, then each entry of this job after `after`,
    a ping when idle, until `done` (or the relay closing: a last `retry:` sends the
    client on)."""
    await body.write(f"retry: {RETRY_MS}\n\n".encode())
    ended = await follow(gateway, _Follower(job_id), stream, after, body)
    if ended is not None:
        await body.write(ended)


async def follow(gateway: Gateway, follower: Follower[S], stream: str, after: str,
                 body: Body) -> bytes | None:
    """Write what `follower` makes of the stream's entries after `after` until it is
    done; None then, else the bytes the contract ends such a response with (the stream
    cannot be read, the relay is closing). Every streaming route goes through here.
    The reader writes new entries to the socket itself (`take`); this task wakes only
    to flush what the socket did not take, to catch up a client that fell behind, to
    ping, and to end."""
    relay, config, metrics = gateway.relay, gateway.config, gateway.metrics

    def take(entries: Sequence[Entry]) -> bool:
        """Called by the reader with this client's new entries: written now (True), or
        refused (False) while its socket still holds an earlier write."""
        if follower.done:
            return True  # nothing after `done` is sent
        data, reached, count = follower.frame(entries)
        if data:
            written = body.write_nowait(data)
            if written is Written.REFUSED:
                return False
            metrics.relayed += count
            if written is Written.WAITING:
                subscription.wake.set()
        follower.commit(reached)
        if follower.done:
            subscription.wake.set()
        return True

    subscription = relay.subscribe(stream, after, take)
    try:
        while not follower.done:
            if subscription.behind and not subscription.ended:
                await _catch_up(gateway, subscription, follower, body)
                continue
            with trio.move_on_after(config.gateway.heartbeat_s) as idle:
                await subscription.wake.wait()
            subscription.wake = trio.Event()
            if body.pending:
                await body.flush()
            if follower.done:
                return None
            if subscription.failure is not None:
                return stream_read_error(subscription.failure)
            if subscription.ended:
                return b"retry: 1000\n\n"
            if idle.cancelled_caught:
                await body.write(b": ping\n\n")
    finally:
        relay.unsubscribe(subscription)
    return None


async def _catch_up(gateway: Gateway, subscription: Subscription, follower: Follower[S],
                    body: Body) -> None:
    """A client whose socket refused entries reads them from Redis by itself, writing
    each batch before the reader serves it again (so nothing the reader writes comes
    before what it missed)."""
    try:
        entries, whole = await gateway.relay.catch_up(subscription, gateway.reads.after)
    except PermanentError as exc:  # this stream cannot be read: this client ends
        subscription.fail(str(exc))
        return
    data, reached, count = follower.frame(entries)
    if data:
        await body.write(data)
        gateway.metrics.relayed += count
    follower.commit(reached)
    if whole and not follower.done:
        gateway.relay.resume(subscription)
