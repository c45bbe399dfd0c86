"""The honest users: a few turns per session through the gateway, as the page does.

Each turn POSTs /v1/chat with an Idempotency-Key (retried with the same key after a
503 or a lost answer), then follows the job's events until `done`, reconnecting with
its `Last-Event-ID` as EventSource does. Every entry id received is kept (the harness
compares them with the job's Redis stream) and so is each event's XADD -> client
latency: its arrival on the wall clock minus the milliseconds of its entry id, which
Redis stamps at the XADD. A few users also upload a small note now and then.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import trio

from bench.hostile.http import Event, HttpFailed, call, events
from bench.hostile.plan import Context, marker

RETRYABLE = (0, 429, 502, 503, 504)  # 0: no answer (a timeout, a reset)
RECONNECT_S = 0.5


@dataclass
class Request:
    """One logical request: every POST made for it, and what its job delivered."""

    marker: str
    user: str
    keyed: bool = True
    statuses: list[int] = field(default_factory=list[int])  # of each POST, in order
    jobs: list[str] = field(default_factory=list[str])  # every jobId answered
    post_ms: float | None = None  # the POST that was accepted
    post_at_s: float | None = None  # when it began, from the phase's start
    ids: list[str] = field(default_factory=list[str])  # entry ids received, in order
    done: str | None = None  # the `done` event's status, once received
    caught_up: int = 0  # entries written before the response that got them opened
    notes: list[str] = field(default_factory=list[str])  # what went wrong on the way

    def as_json(self) -> dict[str, Any]:
        return self.__dict__


async def post_chat(ctx: Context, user: str, body: dict[str, Any], request: Request, *,
                    deadline: float, retry_on: tuple[int, ...] = RETRYABLE,
                    tries: int = 6) -> str | None:
    """POST /v1/chat until it is accepted (its jobId), refused for good, or `tries`."""
    payload = json.dumps(body).encode()
    extra = {"idempotency-key": f"k-{request.marker}"} if request.keyed else {}
    for _ in range(tries):
        began = trio.current_time()
        if began >= deadline:
            break
        status, retry_after, job_id = 0, 1.0, None
        with trio.move_on_at(min(deadline, began + ctx.plan.post_timeout_s)):
            try:
                answer = await call(ctx.plan.port, "POST", "/v1/chat", ctx.headers(
                    user, **{"content-type": "application/json"}, **extra), payload)
                status = answer.status
                if status == 202:
                    job_id = str(json.loads(answer.body)["jobId"])
                retry_after = float(answer.headers.get("retry-after", "1") or 1)
            except (HttpFailed, ValueError, KeyError) as exc:
                request.notes.append(f"POST: {exc}"[:200])
        request.statuses.append(status)
        if job_id is not None:
            request.post_ms = (trio.current_time() - began) * 1000
            request.post_at_s = began - ctx.began
            request.jobs.append(job_id)
            return job_id
        if status not in retry_on:
            break
        await trio.sleep(min(max(retry_after, 0.2), 3.0))
    return None


async def follow(ctx: Context, user: str, job_id: str, request: Request, deadline: float,
                 latencies_ms: list[float] | None = None) -> None:
    """Read the job's events until `done` or `deadline`, reconnecting after a break.
    The latency is noted for entries written while the response was open: one written
    before (caught up from Redis) waited for the client's own connect."""
    seen: set[str] = set()
    last: list[str] = []
    opened = [float("inf")]

    def open_at(ms: float) -> None:
        opened[0] = ms

    def got(event: Event, arrived_ms: float) -> None:
        if event.event == "error" and not event.id:
            request.notes.append(f"event: error {event.data}"[:200])
            return
        if not event.id or event.id in seen:
            return
        seen.add(event.id)
        last[:] = [event.id]
        request.ids.append(event.id)
        written_ms = int(event.id.partition("-")[0])
        if latencies_ms is not None and written_ms >= int(opened[0]):
            latencies_ms.append(arrived_ms - written_ms)
        elif latencies_ms is not None:
            request.caught_up += 1
        if event.event == "done":
            try:
                request.done = str(json.loads(event.data).get("status"))
            except (ValueError, AttributeError):
                request.done = "?"

    while request.done is None and trio.current_time() < deadline:
        headers = ctx.headers(user, accept="text/event-stream")
        if last:
            headers["last-event-id"] = last[0]
        with trio.move_on_at(deadline):
            try:
                answer = await events(ctx.plan.port, f"/v1/jobs/{job_id}/events", headers, got,
                                      open_at)
                if answer.status == 204:  # resumed at its `done`: nothing more will come
                    request.done = request.done or "204"
                elif answer.status != 200:
                    request.notes.append(f"GET events: {answer.status} {answer.body[:120]!r}")
            except HttpFailed as exc:
                request.notes.append(f"GET events: {exc}"[:200])
        if request.done is None:
            await trio.sleep(RECONNECT_S)


@dataclass
class HonestTally:
    requests: list[Request] = field(default_factory=list[Request])
    latencies_ms: list[float] = field(default_factory=list[float])
    uploads: list[tuple[int, float]] = field(default_factory=list[tuple[int, float]])

    def as_json(self) -> dict[str, Any]:
        return {"requests": [r.as_json() for r in self.requests],
                "latencies_ms": [round(v, 2) for v in self.latencies_ms],
                "uploads": self.uploads}


async def honest_user(ctx: Context, n: int, tally: HonestTally) -> None:
    plan = ctx.plan
    rng = random.Random(plan.seed * 1000 + n)
    user = f"honest-{n:02d}"
    session = uuid.uuid4().hex[:12]
    await trio.sleep(rng.uniform(0, plan.think_s[1]))  # not all at once
    turn = 0
    while trio.current_time() < ctx.end:
        request = Request(marker(), user)
        tally.requests.append(request)
        deadline = trio.current_time() + plan.turn_timeout_s
        body = {"sessionId": session, "message": f"question {turn} of {user} {request.marker}"}
        job_id = await post_chat(ctx, user, body, request, deadline=deadline)
        if job_id is not None:
            await follow(ctx, user, job_id, request, deadline, tally.latencies_ms)
        turn += 1
        if turn % plan.turns_per_session == 0:
            session = uuid.uuid4().hex[:12]
        await trio.sleep(rng.uniform(*plan.think_s))


async def honest_uploader(ctx: Context, n: int, tally: HonestTally) -> None:
    """A small note (26 bytes or so) every `upload_every_s`: how long does it wait?"""
    plan = ctx.plan
    user = f"honest-{n:02d}"
    await trio.sleep(plan.upload_every_s * n / max(plan.uploaders, 1))
    count = 0
    while trio.current_time() < ctx.end:
        body = f"note {count} from {user}.\n".encode()
        began, status = trio.current_time(), 0
        with trio.move_on_after(plan.upload_timeout_s):
            try:
                status = (await call(plan.port, "PUT", f"/v1/documents/note-{n}.txt",
                                     ctx.headers(user, **{"content-type": "text/plain"}),
                                     body)).status
            except HttpFailed:
                status = 0
        tally.uploads.append((status, round(trio.current_time() - began, 3)))
        count += 1
        await trio.sleep(plan.upload_every_s)


async def run_honest(ctx: Context, tally: HonestTally) -> None:
    async with trio.open_nursery() as nursery:
        for n in range(ctx.plan.users):
            nursery.start_soon(honest_user, ctx, n, tally)
        for n in range(min(ctx.plan.uploaders, ctx.plan.users)):
            nursery.start_soon(honest_uploader, ctx, n, tally)
