"""The hostile users of phase B, one kind each, all bounded in count and in time.

Each kind counts what it sent and the status codes it got back (0: no answer within
its bound, or the connection broke first), so the printout shows which limits the
gateway already enforces. Requests that reach the vendor end their message with a
marker (the harness counts the jobs each logical request ran).
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

from bench.hostile.honest import Request, follow, post_chat
from bench.hostile.http import HOST, Event, HttpFailed, call, events
from bench.hostile.inputs import FORGED_IDS, pdf_bomb, schema_bomb_request
from bench.hostile.plan import Context, marker

FORGED_HOLD_S = 15.0  # long enough for a stalled reader to cost the others their turns
OVERSIZE_BYTES = 400 * 1024 * 1024
SLOW_DECLARED = 4096
SLOW_EVERY_S = 0.5  # one byte each: two bytes a second
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


@dataclass
class Kind:
    sent: int = 0
    status: Counter[str] = field(default_factory=Counter[str])
    notes: dict[str, Any] = field(default_factory=dict[str, Any])

    def got(self, status: int | str) -> None:
        self.sent += 1
        self.status[str(status)] += 1


@dataclass
class HostileTally:
    kinds: dict[str, Kind] = field(default_factory=dict[str, Kind])
    requests: list[Request] = field(default_factory=list[Request])

    def kind(self, name: str) -> Kind:
        return self.kinds.setdefault(name, Kind())

    def as_json(self) -> dict[str, Any]:
        return {"kinds": {name: {"sent": k.sent, "status": dict(k.status), **k.notes}
                          for name, k in self.kinds.items()},
                "requests": [r.as_json() for r in self.requests]}


async def forged_resumes(ctx: Context, n: int, tally: HostileTally) -> None:
    """Own jobs, resumed while they run with a `Last-Event-ID` no Redis accepts."""
    user, kind, turn = f"mallory-lei-{n}", tally.kind("forged Last-Event-ID"), 0
    kind.notes.setdefault("event_error", 0)
    while trio.current_time() < ctx.end:
        request = Request(marker(), user)
        tally.requests.append(request)
        body = {"sessionId": f"lei-{n}-{turn}", "message": f"resume me {request.marker}"}
        job_id = await post_chat(ctx, user, body, request, deadline=ctx.end, tries=1)
        if job_id is not None:
            status, error = await _resume(ctx, user, job_id, FORGED_IDS[(turn + n) % len(FORGED_IDS)])
            kind.got(status)
            kind.notes["event_error"] += error
        turn += 1
        await trio.sleep(1.0)


async def _resume(ctx: Context, user: str, job_id: str, forged: str) -> tuple[int, bool]:
    """GET the job's events from `forged`, held open FORGED_HOLD_S at most: (status,
    whether an `event: error` came)."""
    said: list[Event] = []
    status = [0]

    def opened(_: float) -> None:
        status[0] = 200  # (held open until the server or we end it)

    with trio.move_on_after(FORGED_HOLD_S):
        try:
            status[0] = (await events(ctx.plan.port, f"/v1/jobs/{job_id}/events",
                                      ctx.headers(user, **{"last-event-id": forged}),
                                      lambda event, _: said.append(event), opened)).status
        except HttpFailed:
            pass
    return status[0], any(e.event == "error" for e in said)


async def _send_body(stream: trio.SocketStream, head: bytes, declared: int, chunked: bool,
                     sent: list[int]) -> None:
    """Send `head`, then `declared` bytes of body; `sent[0]` counts them as they go."""
    piece = b"a" * 65_536
    try:
        await stream.send_all(head)
        while sent[0] < declared:
            part = piece[:declared - sent[0]]
            await stream.send_all(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            sent[0] += len(part)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _answer_status(stream: trio.SocketStream) -> int:
    """The status of the gateway's answer on `stream` (0: it closed without one)."""
    try:
        first = await stream.receive_some(4096)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        first = b""
    found = STATUS.match(first)
    return int(found[1]) if found else 0


async def oversized(ctx: Context, tally: HostileTally) -> None:
    """POST /v1/chat bodies of 400 MB, declared in Content-Length or chunked: how much
    does the gateway take before it answers?"""
    kind = tally.kind("400 MB body")
    taken: list[int] = kind.notes.setdefault("bytes_sent_before_answer", [])
    for turn in range(ctx.plan.oversize_count):
        if trio.current_time() >= ctx.end:
            break
        status, sent = await _oversized_once(ctx, "mallory-body", chunked=turn % 2 == 1)
        kind.got(status)
        taken.append(sent)
        await trio.sleep(2)


async def _oversized_once(ctx: Context, user: str, *, chunked: bool) -> tuple[int, int]:
    """One 400 MB body, sent until the gateway answers or `oversize_cap_s`: (status,
    bytes sent)."""
    framing = "transfer-encoding: chunked" if chunked else f"content-length: {OVERSIZE_BYTES}"
    head = (f"POST /v1/chat HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n"
            f"authorization: Bearer {ctx.token(user)}\r\n"
            f"content-type: application/json\r\n{framing}\r\n\r\n").encode()
    status, sent = 0, [0]
    with trio.move_on_after(ctx.plan.oversize_cap_s):
        try:
            stream = await trio.open_tcp_stream(HOST, ctx.plan.port)
        except OSError:
            return 0, 0
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(_send_body, stream, head, OVERSIZE_BYTES, chunked, sent)
            status = await _answer_status(stream)
            nursery.cancel_scope.cancel()
    return status, sent[0]


async def slowloris(ctx: Context, tally: HostileTally) -> None:
    """Bodies that come a byte at a time, two bytes a second: `slow_connections` at
    once, each opened again when the gateway ends it, until the phase ends."""
    user, kind = "mallory-slow", tally.kind("slowloris body")
    kind.notes["longest_held_s"] = 0.0

    async def one() -> None:
        while trio.current_time() < ctx.end:
            began = trio.current_time()
            status = await _slow_body(ctx, user)
            kind.got(status)
            kind.notes["longest_held_s"] = max(kind.notes["longest_held_s"],
                                               round(trio.current_time() - began, 1))
            if status == 0:
                await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        for _ in range(ctx.plan.slow_connections):
            nursery.start_soon(one)


async def _slow_body(ctx: Context, user: str) -> int | str:
    """One slow body until the gateway answers (its status; 0: closed without one) or
    the phase ends ("held to the end")."""
    head = (f"POST /v1/chat HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n"
            f"authorization: Bearer {ctx.token(user)}\r\ncontent-type: application/json\r\n"
            f"content-length: {SLOW_DECLARED}\r\n\r\n").encode()
    status: int | str = "held to the end"
    try:
        stream = await trio.open_tcp_stream(HOST, ctx.plan.port)
    except OSError:
        return 0
    async with stream, trio.open_nursery() as nursery:
        async def trickle() -> None:
            try:
                await stream.send_all(head)
                for _ in range(SLOW_DECLARED - 1):
                    await trio.sleep(SLOW_EVERY_S)
                    await stream.send_all(b" ")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

        nursery.start_soon(trickle)
        with trio.move_on_at(ctx.end):
            status = await _answer_status(stream)
        nursery.cancel_scope.cancel()
    return status


async def schema_bombs(ctx: Context, tally: HostileTally) -> None:
    """v2 requests whose tool parameters (or response schema) expand to gigabytes,
    spread over the phase; each one's job is followed to its `done`."""
    user, kind = "mallory-schema", tally.kind("tool-schema bomb")
    levels = ctx.plan.schema_levels
    gap = ctx.plan.seconds / (len(levels) + 1)

    async def one(turn: int, depth: int) -> None:
        await trio.sleep(gap * (turn + 0.5))
        request = Request(marker(), user)
        tally.requests.append(request)
        body = schema_bomb_request(depth, request.marker, f"bomb-{turn}",
                                   model=ctx.plan.schema_model, in_response_format=turn % 2 == 1)
        deadline = trio.current_time() + ctx.plan.schema_wait_s
        job_id = await post_chat(ctx, user, body, request, deadline=deadline, tries=1)
        kind.got(request.statuses[-1] if request.statuses else 0)
        if job_id is not None:
            await follow(ctx, user, job_id, request, deadline)
            kind.notes.setdefault("done", []).append(request.done or "none in time")

    async with trio.open_nursery() as nursery:
        for turn, depth in enumerate(levels):
            nursery.start_soon(one, turn, depth)


async def pdf_bombs(ctx: Context, tally: HostileTally) -> None:
    """PUT /v1/documents/<name>.pdf of a PDF whose 2,000 pages share one 1 MB stream."""
    user, kind = "mallory-pdf", tally.kind("PDF bomb")
    data = pdf_bomb()
    kind.notes["pdf_bytes"] = len(data)
    waited: list[float] = kind.notes.setdefault("seconds", [])
    gap = ctx.plan.seconds / (ctx.plan.pdf_count + 1)

    async def one(turn: int) -> None:
        await trio.sleep(gap * turn)
        began, status = trio.current_time(), 0
        with trio.move_on_after(ctx.plan.pdf_wait_s):
            try:
                status = (await call(ctx.plan.port, "PUT", f"/v1/documents/bomb-{turn}.pdf",
                                     ctx.headers(user, **{"content-type": "application/pdf"}),
                                     data)).status
            except HttpFailed:
                pass
        kind.got(status)
        waited.append(round(trio.current_time() - began, 1))

    async with trio.open_nursery() as nursery:
        for turn in range(ctx.plan.pdf_count):
            nursery.start_soon(one, turn)


async def unknown_bursts(ctx: Context, n: int, tally: HostileTally) -> None:
    """Hundreds of event requests at once for jobs that do not exist, held open."""
    user, kind = f"mallory-burst-{n}", tally.kind("unknown-job burst")
    plan = ctx.plan
    gap = plan.seconds / max(plan.bursts, 1)

    async def one() -> None:
        status = 0
        with trio.move_on_after(plan.burst_hold_s):
            try:
                status = (await events(plan.port, f"/v1/jobs/{uuid.uuid4()}/events",
                                       ctx.headers(user), lambda event, _: None)).status
            except HttpFailed:
                pass
        kind.got(status)

    await trio.sleep(gap * n / max(plan.burst_users, 1))
    for _ in range(plan.bursts):
        if trio.current_time() >= ctx.end:
            break
        began = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(plan.burst_size):
                nursery.start_soon(one)
        await trio.sleep(max(0.0, gap - (trio.current_time() - began)))


async def retries_across_pause(ctx: Context, tally: HostileTally) -> None:
    """Requests sent while the broker is frozen, retried after its 503: half with an
    Idempotency-Key (retried after any failure, and once more after the 202, as a
    client whose answer was lost would), half without (retried only after a 503,
    which the contract says is a refusal)."""
    user, kind = "mallory-retry", tally.kind("retry after broker pause")
    plan = ctx.plan
    await trio.sleep_until(ctx.began + plan.pause_at + 0.5)

    async def one(turn: int) -> None:
        request = Request(marker(), user, keyed=turn % 2 == 0)
        tally.requests.append(request)
        body = {"sessionId": f"retry-{turn}", "message": f"pay once {request.marker}"}
        deadline = ctx.end + plan.pause_s + plan.post_timeout_s
        job_id = await post_chat(ctx, user, body, request, deadline=deadline,
                                 retry_on=(0, 502, 503, 504) if request.keyed else (503,))
        for status in request.statuses:
            kind.got(status)
        if job_id is not None:
            if request.keyed:  # the answer "lost on the way": the same key again
                await post_chat(ctx, user, body, request, deadline=deadline, tries=1)
            await follow(ctx, user, job_id, request, trio.current_time() + plan.turn_timeout_s)
        kind.notes.setdefault("done", []).append(request.done or "none")
        if request.keyed:
            kind.notes.setdefault("jobIds_per_key", []).append(len(set(request.jobs)))

    async with trio.open_nursery() as nursery:
        for turn in range(plan.retry_count):
            nursery.start_soon(one, turn)


KINDS = ("forged Last-Event-ID", "400 MB body", "slowloris body", "tool-schema bomb",
         "PDF bomb", "unknown-job burst", "retry after broker pause")


async def run_hostile(ctx: Context, tally: HostileTally) -> None:
    plan = ctx.plan
    for name in KINDS:  # (in this order in the printout)
        tally.kind(name)
    async with trio.open_nursery() as nursery:
        for n in range(plan.lei_users):
            nursery.start_soon(forged_resumes, ctx, n, tally)
        nursery.start_soon(oversized, ctx, tally)
        nursery.start_soon(slowloris, ctx, tally)
        nursery.start_soon(schema_bombs, ctx, tally)
        nursery.start_soon(pdf_bombs, ctx, tally)
        for n in range(plan.burst_users):
            nursery.start_soon(unknown_bursts, ctx, n, tally)
        if plan.pause_s > 0:
            nursery.start_soon(retries_across_pause, ctx, tally)

