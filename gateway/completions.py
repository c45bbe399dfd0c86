"""OpenAI's API on the gateway (docs/contract.md 7.2): GET /v1/models and
POST /v1/chat/completions, each call one job in a session of its own (`cc-<jobId>`).

The answer's HTTP status waits for the job's first event: `started` is 200 and the
stream (or, once the job is done, the body); an `error` is the status its code
means, in OpenAI's error shape. A client that goes away, streaming or not, cancels
its job. The stream goes through the gateway's one streaming path (app.follow), as
`chat.completion.chunk` lines.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.app import (
    Body,
    EventStream,
    Gateway,
    follow,
    idempotency_header,
    json_body_sized,
    submit,
    too_many_streams,
    uuid7,
)
from gateway.auth import Caller
from gateway.openai_wire import (
    Chunks,
    OpenAIError,
    Outcome,
    Translated,
    completion,
    failure,
    models,
    outcome,
    param_of,
    refusal_of,
    to_request,
)
from messages.ports import U64_MAX, Entry
from messages.wire import BadInput

log = logging.getLogger("chat_actors.gateway")

SESSION_PREFIX = "cc-"  # a Chat Completions call's own session (not listed by /v1/sessions)
CANCEL_WAIT_S = 5.0  # how long a hang-up's cancel may take to reach the broker


def openai_error(error: OpenAIError) -> JSONResponse:
    response = JSONResponse(error.body(), status_code=error.status)
    if error.retry_after_s is not None:
        response.headers["retry-after"] = str(math.ceil(error.retry_after_s))
        response.headers["retry-after-ms"] = str(math.ceil(error.retry_after_s * 1000))
    if error.retry is False:
        response.headers["x-should-retry"] = "false"
    return response


def openai_shaped(response: Response) -> Response:
    """A refusal the gateway's shared steps answered (`{"error": {"message", ...}}`) in
    OpenAI's shape: type, param and code always there."""
    if response.status_code < 400 or not isinstance(response, JSONResponse):
        return response
    try:
        error = json.loads(bytes(response.body))["error"]
    except (ValueError, KeyError, TypeError):
        return response
    if "type" in error:  # in OpenAI's shape already
        return response
    kind = {401: "invalid_request_error", 429: "rate_limit_error"}.get(
        response.status_code, "server_error" if response.status_code >= 500
        else "invalid_request_error")
    body = {"error": {"message": error.get("message", ""), "type": kind,
                      "param": error.get("field"), "code": error.get("code")}}
    shaped = JSONResponse(body, status_code=response.status_code)
    for name, value in response.headers.items():
        if name not in ("content-length", "content-type"):
            shaped.headers[name] = value
    return shaped


async def list_models(gateway: Gateway, request: Request, caller: Caller) -> Response:
    return JSONResponse(models(gateway.config.llm.models, int(time.time())))


def _translated(gateway: Gateway, value: Any, size: int) -> Translated:
    limit = gateway.config.limits.max_request_bytes
    if size > limit:  # the whole body travels as the request
        raise OpenAIError(413, f"the body is {size} bytes; the limit is {limit} "
                          "(limits.max_request_bytes)", param="messages",
                          code="request_too_large", retry=False)
    return to_request(value, aliases=gateway.config.llm.models)


def _request_bytes(gateway: Gateway, translated: Translated, job_id: str,
                   caller: Caller) -> tuple[bytes, str]:
    """The contract v3 request, checked by the workers' own decoder, and its session."""
    session = SESSION_PREFIX + job_id
    value = {**translated.value, "jobId": job_id, "userId": caller.user, "sessionId": session}
    if caller.key_id is not None:
        value["apiKeyId"] = caller.key_id
    raw = json.dumps(value, ensure_ascii=False).encode()
    limit = gateway.config.limits.max_request_bytes
    if len(raw) > limit:
        raise OpenAIError(413, f"the request is {len(raw)} bytes as sent to the workers; the "
                          f"limit is {limit} (limits.max_request_bytes)", param="messages",
                          code="request_too_large", retry=False)
    try:
        gateway.config.decode_request(raw)
    except BadInput as exc:
        raise OpenAIError(400, exc.rule, param=param_of(exc.field), retry=False) from None
    return raw, session


async def chat_completions(gateway: Gateway, request: Request, caller: Caller) -> Response:
    try:
        value, size = await json_body_sized(request, gateway.config)
        translated = _translated(gateway, value, size)
        job_id = uuid7()
        raw, session = _request_bytes(gateway, translated, job_id, caller)
    except OpenAIError as error:
        return openai_error(error)
    key = idempotency_header(request)
    if isinstance(key, Response):
        return openai_shaped(key)
    # A call holds one of the user's stream slots from before its job is sent until its
    # answer ends (gateway.max_streams_per_user), as an event stream does.
    most, wait = gateway.config.gateway.max_streams_per_user, gateway.config.gateway.stream_wait_s
    if not gateway.stream_slots.take(caller.user, most):
        return openai_shaped(too_many_streams(most, wait))
    release = partial(gateway.stream_slots.give_back, caller.user)
    try:
        answered = await _call(gateway, request, caller, job_id, raw, session, key, translated)
    except BaseException:
        release()
        raise
    if isinstance(answered, EventStream):
        answered.on_close = release
    else:
        release()
    return answered


async def _call(gateway: Gateway, request: Request, caller: Caller, job_id: str, raw: bytes,
                session: str, key: str | None, translated: Translated) -> Response:
    sent = await submit(gateway, request, caller.user, job_id, raw, session, key)
    if isinstance(sent, Response):
        return openai_shaped(sent)
    if sent != job_id:  # an Idempotency-Key seen before answers with the earlier job
        job_id, session = sent, SESSION_PREFIX + sent
    answered = await _answer(gateway, request, caller, job_id, session, translated)
    answered.headers["x-request-id"] = job_id
    return answered


async def _answer(gateway: Gateway, request: Request, caller: Caller, job_id: str,
                  session: str, translated: Translated) -> Response:
    """The job's answer, its status held until its first event; a hang-up meanwhile
    cancels the job."""
    stream = gateway.config.job_keys(job_id).stream
    created = int(time.time())
    answer: Response | None = None
    async with trio.open_nursery() as nursery:
        async def hung_up() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(hung_up)
        try:
            answer = await _held(gateway, job_id, caller.user, session, stream, translated,
                                 created)
        finally:
            if answer is None:  # gone before the answer was ready
                await cancel_job(gateway, job_id, caller.user, "the client went away")
        nursery.cancel_scope.cancel()
    return answer if answer is not None else Response(status_code=499)  # nobody reads it


async def _held(gateway: Gateway, job_id: str, user: str, session: str, stream: str,
                translated: Translated, created: int) -> Response:
    config = gateway.config
    entries = await _started(gateway, job_id, user, session, stream)
    if not entries:
        return openai_error(OpenAIError(
            503, f"the job did not start within {config.gateway.stream_wait_s:g} s "
            "(gateway.stream_wait_s) and never will; nothing was produced: try again",
            type="server_error", code="not_started", retry_after_s=2.0))
    first_id, first = entries[0]
    if first.get("event") == "error":  # refused before it started (`done` follows)
        return openai_error(refusal_of(first))
    if translated.stream:
        chunks = Chunks(job_id=job_id, model=translated.model, created=created,
                        include_usage=translated.include_usage)
        return CompletionStream(gateway, job_id, user, stream, _before(first_id), chunks)
    limit = config.jobs.timeout_s + config.gateway.stream_wait_s
    with trio.move_on_after(limit):
        ended = outcome(job_id, await read_until(gateway, job_id, stream, _ended))
        if ended is not None and ended.final is not None:
            return JSONResponse(completion(job_id, translated.model, created, ended))
        return openai_error(_refusal(ended))
    return openai_error(OpenAIError(504, f"the job did not end within {limit:g} s",
                                    type="timeout", code="timeout"))


async def _started(gateway: Gateway, job_id: str, user: str, session: str,
                   stream: str) -> list[Entry]:
    """The job's first entries; [] when no worker started it within stream_wait_s: then
    it is fenced (a terminal row no worker runs), so a refusal is a refusal. A worker
    that claimed it meanwhile is waited for."""
    wait = gateway.config.gateway.stream_wait_s
    for turn in range(2):
        entries: list[Entry] = []
        with trio.move_on_after(wait) as waited:
            entries = await read_until(gateway, job_id, stream, _first_event)
        if entries:
            return entries
        if turn == 0 and waited.cancelled_caught and await gateway.history.fence_refused(
                job_id=job_id, user_id=user, session_id=session,
                reason=f"no worker started it within {wait:g} s (gateway.stream_wait_s)"):
            return []
    # Claimed, yet nothing on its stream (expired, or it cannot be read): it ends now.
    await cancel_job(gateway, job_id, user, "its events cannot be read")
    return []


def _refusal(ended: Outcome | None) -> OpenAIError:
    if ended is None or ended.error is None:
        status = ended.status if ended is not None else "unknown"
        return failure("cancelled" if status == "cancelled" else "internal",
                       f"the job ended {status}")
    return ended.error


def _first_event(entries: Sequence[Entry]) -> bool:
    return bool(entries)


def _ended(entries: Sequence[Entry]) -> bool:
    return bool(entries) and entries[-1][1].get("event") == "done"


def _before(entry_id: str) -> str:
    """The stream position just before `entry_id` (read from there, it comes first)."""
    ms, _, seq = entry_id.partition("-")
    if int(seq):
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-{U64_MAX}" if int(ms) else "0-0"


async def read_until(gateway: Gateway, job_id: str, stream: str,
                     enough: Any) -> list[Entry]:
    """This job's entries, from the start of its stream, once `enough(entries)` holds
    (through the relay's reader, as every stream is read). A stream that cannot be
    read ends the wait with what was read."""
    found: list[Entry] = []

    def take(entries: Sequence[Entry]) -> bool:
        found.extend(e for e in entries if e[1].get("jobId") == job_id)
        if enough(found):
            subscription.wake.set()
        return True

    subscription = gateway.relay.subscribe(stream, "0-0", take)
    try:
        while not enough(found) and not subscription.ended:
            await subscription.wake.wait()
            subscription.wake = trio.Event()
    finally:
        gateway.relay.unsubscribe(subscription)
    return found


async def cancel_job(gateway: Gateway, job_id: str, user: str, reason: str) -> None:
    """Ask the workers to cancel the job (a client that went away is billed for what was
    generated, no more). Shielded: it runs while its request is being cancelled."""
    message = json.dumps({"type": "cancel", "jobId": job_id, "userId": user,
                          "reason": reason}).encode()
    with trio.move_on_after(CANCEL_WAIT_S, shield=True):
        try:
            await gateway.produce(gateway.config.kafka.control_topic, message,
                                  job_id.encode(), [])
        except Exception as exc:  # the job then runs to its end: logged, never raised
            log.warning("job %s: its cancel could not be sent (%s)", job_id, exc)


class _ChunkFollower:
    """app.Follower of a Chat Completions stream: `Chunks` values, kept once written."""

    def __init__(self, chunks: Chunks) -> None:
        self.chunks = chunks

    @property
    def done(self) -> bool:
        return self.chunks.done

    def frame(self, entries: Sequence[Entry]) -> tuple[bytes, Chunks, int]:
        return self.chunks.frame(entries)

    def commit(self, reached: Chunks) -> None:
        self.chunks = reached


class CompletionStream(EventStream):
    """The `chat.completion.chunk` stream of a job that started; a client that goes
    away before its end cancels the job."""

    def __init__(self, gateway: Gateway, job_id: str, user: str, stream: str, after: str,
                 chunks: Chunks) -> None:
        follower = _ChunkFollower(chunks)

        async def run(body: Body) -> None:
            try:
                ended = await follow(gateway, follower, stream, after, body)
            finally:
                if not follower.done:
                    await cancel_job(gateway, job_id, user, "the client went away")
            if ended is not None:  # the relay is closing or the stream cannot be read
                await body.write(STREAM_ENDED)

        super().__init__(run)


STREAM_ENDED = (b'data: {"error": {"message": "the stream ended before the answer did (the '
                b'gateway is restarting, or the job\'s events cannot be read); the job was '
                b'cancelled", "type": "server_error", "param": null, "code": "stream_ended"}}'
                b'\n\n')
