"""The gateway's HTTP contract (docs/contract.md 7) on the real local stack: auth,
validation, ownership, idempotency, the SSE relay with resume and heartbeats, 204
after `done`, cancel, history and delete, and a client that never reads."""

from __future__ import annotations

import inspect
import json
import os
import random
import time
import uuid
from functools import partial
from typing import Any

import httpx
import jwt
import pytest
import trio

from actors.errors import PermanentError
from config import ConfigError
from gateway.app import OWNER_PREFIX, uuid7
from gateway.auth import user_id_of
from gateway.relay import READ_COUNT
from gateway.server import run_gateway
from tests.helpers import JWT_SECRET as SECRET
from tests.helpers import events_of, gateway_running, raw_status, worker_running
from tests.scripted_llm import Reply


def token(user: str = "alice", *, exp_in: float = 600, secret: str = SECRET,
          algorithm: str = "HS256", **claims: Any) -> str:
    body = {"sub": user, "exp": int(time.time() + exp_in), **claims}
    return jwt.encode(body, secret, algorithm=algorithm)


def bearer(user: str = "alice", **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, **kwargs)}"}


def blocks(text: str) -> list[dict[str, str]]:
    """Every SSE event of a response, as its fields (those without an `id` too)."""
    found: list[dict[str, str]] = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            fields[name] = value
        if "event" in fields:
            found.append(fields)
    return found


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The events of a stream entry (those with an `id`), their data decoded."""
    return [{"id": fields["id"], "event": fields["event"], "data": json.loads(fields["data"])}
            for fields in blocks(text) if "id" in fields]


async def read_events(client: httpx.AsyncClient, job_id: str, user: str = "alice",
                      last: str | None = None) -> tuple[int, str]:
    headers = bearer(user) | ({"Last-Event-ID": last} if last else {})
    response = await client.get(f"/v1/jobs/{job_id}/events", headers=headers)
    return response.status_code, response.text


def test_a_user_id_outside_the_charset_is_hashed_stably():
    assert user_id_of("alice") == "alice"
    hashed = user_id_of("auth0|5f7c8ec7c33c6c004bbafe82")
    assert hashed.startswith("h-") and len(hashed) == 34 and hashed == user_id_of(
        "auth0|5f7c8ec7c33c6c004bbafe82")
    assert user_id_of("bob@example.com") != user_id_of("bob@example.org")


def test_uuid7_is_version_7_and_time_ordered():
    first, second = uuid7(), uuid7()
    assert uuid.UUID(first).version == 7 and uuid.UUID(first).variant == uuid.RFC_4122
    assert first[:13] <= second[:13]


async def test_every_v1_call_needs_a_valid_bearer_token(gw_config):
    config = gw_config(CHAT_ACTORS__GATEWAY__JWT_AUDIENCE="chat")
    cases = {
        "missing": {},
        "not bearer": {"Authorization": f"Basic {token(aud='chat')}"},
        "expired": bearer(exp_in=-10, aud="chat"),
        "no exp": {"Authorization": "Bearer " + jwt.encode({"sub": "a", "aud": "chat"}, SECRET)},
        "wrong secret": bearer(secret="t" * 64, aud="chat"),
        "wrong audience": bearer(aud="other"),
        "another algorithm": {"Authorization": "Bearer " + jwt.encode(
            {"sub": "a", "exp": int(time.time()) + 60, "aud": "chat"}, SECRET, algorithm="HS512")},
        "alg none": {"Authorization": "Bearer " + jwt.encode(
            {"sub": "a", "exp": int(time.time()) + 60, "aud": "chat"}, None, algorithm="none")},
        "cookie only": {"Cookie": f"token={token(aud='chat')}"},
    }
    async with gateway_running(config) as (_, client):
        for name, headers in cases.items():
            response = await client.get("/v1/sessions", headers=headers)
            assert response.status_code == 401, name
            assert response.json()["error"]["message"], name
        expired = await client.get("/v1/sessions", headers=cases["expired"])
        assert "expired" in expired.json()["error"]["message"]
        ok = await client.get("/v1/sessions", headers=bearer(f"new-{uuid.uuid4().hex}", aud="chat"))
        assert ok.status_code == 200 and ok.json() == {"sessions": []}


async def test_a_request_is_validated_with_the_workers_rules(gw_config):
    config = gw_config()
    async with gateway_running(config) as (_, client):
        bad = {"/v1/chat": [
            ({"sessionId": "s", "message": "hi", "params": {"temperature": 9}},
             "$.params.temperature"),
            ({"sessionId": "s", "message": "hi", "jobId": "mine"}, "$.jobId"),
            ({"sessionId": "s", "message": ""}, "$.message"),
            ({"sessionId": "s", "message": "hi", "model": "nope"}, "$.model"),
            ({"sessionId": "s", "message": "hi", "tools": []}, "$.tools"),
            ([1, 2], "$")]}
        for body, field in bad["/v1/chat"]:
            response = await client.post("/v1/chat", json=body, headers=bearer())
            assert response.status_code == 400, body
            assert response.json()["error"]["field"] == field, body
        broken = await client.post("/v1/chat", content=b"{not json", headers=bearer())
        assert broken.status_code == 400


async def test_an_answer_streams_as_sse_resumes_and_ends_with_204(gw_config, llm, rds):
    config = gw_config()
    llm.default = Reply(tokens=("Hel", "lo", " there"))
    async with worker_running(config), gateway_running(config) as (_, client):
        accepted = await client.post("/v1/chat", json={"sessionId": "s-gw", "message": "Hi"},
                                     headers=bearer())
        assert accepted.status_code == 202
        job_id = accepted.json()["jobId"]
        assert accepted.json()["events"] == f"/v1/jobs/{job_id}/events"
        status, text = await read_events(client, job_id)
        assert status == 200 and text.startswith("retry: ")
        events = parse_sse(text)
        entries = await events_of(rds, config, job_id)
        assert [e["id"] for e in events] == [e["id"] for e in entries]  # Redis entry ids
        assert [e["event"] for e in events] == ["started", "token", "final", "done"] or \
            [e["event"] for e in events][-2:] == ["final", "done"]
        assert all({"attempt", "seq"} <= e["data"].keys() for e in events)
        assert [e["data"]["seq"] for e in events] == list(range(len(events)))
        text_of = "".join(e["data"]["text"] for e in events if e["event"] == "token")
        assert text_of == events[-2]["data"]["text"] == "Hello there"
        # Resume after the second event: the rest, nothing twice.
        status, rest = await read_events(client, job_id, last=events[1]["id"])
        assert status == 200 and [e["id"] for e in parse_sse(rest)] == [
            e["id"] for e in events[2:]]
        # At or after `done`: 204, so the client stops reconnecting.
        assert (await read_events(client, job_id, last=events[-1]["id"]))[0] == 204
        assert (await read_events(client, job_id, last="99999999999999-0"))[0] == 204
        bad = await client.get(f"/v1/jobs/{job_id}/events",
                               headers=bearer() | {"Last-Event-ID": "x; DROP"})
        assert bad.status_code == 400


async def test_another_users_job_is_exactly_an_unknown_job(gw_config, llm):
    config = gw_config(CHAT_ACTORS__GATEWAY__STREAM_WAIT_S="0.3")
    async with worker_running(config), gateway_running(config) as (_, client):
        accepted = await client.post("/v1/chat", json={"sessionId": "s", "message": "Hi"},
                                     headers=bearer("alice"))
        job_id = accepted.json()["jobId"]
        theirs = await client.get(f"/v1/jobs/{job_id}/events", headers=bearer("mallory"))
        unknown = await client.get(f"/v1/jobs/{uuid7()}/events", headers=bearer("mallory"))
        assert theirs.status_code == unknown.status_code == 404
        assert theirs.json() == unknown.json()
        cancel = await client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer("mallory"))
        assert cancel.status_code == 404 and cancel.json() == unknown.json()


async def test_an_idempotency_key_returns_the_same_job_for_the_same_user(gw_config, llm):
    config = gw_config()
    body = {"sessionId": "s-idem", "message": "Once"}
    async with gateway_running(config) as (_, client):
        key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
        first = await client.post("/v1/chat", json=body, headers=bearer("alice") | key)
        again = await client.post("/v1/chat", json=body, headers=bearer("alice") | key)
        other = await client.post("/v1/chat", json=body, headers=bearer("bob") | key)
        assert first.json()["jobId"] == again.json()["jobId"] != other.json()["jobId"]
        bad = await client.post("/v1/chat", json=body,
                                headers=bearer() | {"Idempotency-Key": "a b"})
        assert bad.status_code == 400


async def test_stop_cancels_the_job_and_heartbeats_keep_an_idle_stream_alive(gw_config, llm):
    config = gw_config(CHAT_ACTORS__GATEWAY__HEARTBEAT_S="0.2")
    llm.default = Reply(tokens=tuple("abcdefghijklmnopqrstuvwxyz"), first_token_delay_s=1.0,
                        token_delay_s=0.3)
    async with worker_running(config), gateway_running(config) as (_, client):
        accepted = await client.post("/v1/chat", json={"sessionId": "s-stop", "message": "Go"},
                                     headers=bearer())
        job_id = accepted.json()["jobId"]
        seen: list[str] = []
        async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=bearer()) as stream:
            cancelled = False
            async for line in stream.aiter_lines():
                seen.append(line)
                if line.startswith("event: token") and not cancelled:
                    response = await client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer())
                    assert response.status_code == 202
                    cancelled = True
        assert ": ping" in seen  # the first token took a second: pings meanwhile
        done = parse_sse("\n".join(seen))[-1]
        assert done["event"] == "done" and done["data"]["status"] == "cancelled"


async def test_attempts_pass_through_so_a_client_can_discard_the_earlier_one(gw_config, rds):
    """Entries written straight to Redis: attempt 1 streams, attempt 2 starts over."""
    rows = [("started", 1, 0, {"model": "m", "mode": "gen", "attempt": 1}),
            ("token", 1, 1, {"text": "old"}),
            ("started", 2, 0, {"model": "m", "mode": "gen", "attempt": 2}),
            ("token", 2, 1, {"text": "new"}),
            ("final", 2, 2, {"text": "new"}), ("done", 2, 3, {"status": "completed",
                                                             "partial": False})]
    events = await relayed(gw_config(), rds, rows)
    assert [(e["event"], e["data"]["attempt"], e["data"]["seq"]) for e in events] == [
        (event, attempt, seq) for event, attempt, seq, _ in rows]


async def relayed(config: Any, rds: Any, rows: list[tuple[str, Any, Any, dict[str, Any]]]
                  ) -> list[dict[str, Any]]:
    """Write (event, attempt, seq, data) rows straight to a new job's stream; return the
    events a client of the gateway reads."""
    job_id = uuid7()
    stream = config.job_keys(job_id).stream
    for event, attempt, seq, data in rows:
        rds.xadd(stream, {"event": event, "jobId": job_id, "userId": "alice", "sessionId": "s",
                          "attempt": attempt, "seq": seq, "ts": 0, "data": json.dumps(data)})
    async with gateway_running(config) as (_, client):
        status, text = await read_events(client, job_id)
    assert status == 200
    return parse_sse(text)


async def test_entries_written_again_after_a_failover_reach_a_client_once(gw_config, rds):
    """A writer that lost a reply in a Redis failover writes its batch again on the new
    primary; a client that read the first copy already gets each (attempt, seq) once.
    An entry with a damaged seq or attempt is relayed (as 0), never a broken response."""
    rows = [("started", "1", "0", {"model": "m", "mode": "gen", "attempt": 1}),
            ("token", "1", "1", {"text": "a"}), ("token", "1", "2", {"text": "b"}),
            ("token", "1", "1", {"text": "a"}), ("token", "1", "2", {"text": "b"}),
            ("token", "-1", "banana", {"text": "?"}),
            ("token", "1", "3", {"text": "c"}), ("final", "1", "4", {"text": "abc"}),
            ("done", "1", "5", {"status": "completed", "partial": False})]
    assert [(e["event"], e["data"]["attempt"], e["data"]["seq"], e["data"].get("text"))
            for e in await relayed(gw_config(), rds, rows)] == [
        ("started", 1, 0, None), ("token", 1, 1, "a"), ("token", 1, 2, "b"),
        ("token", 0, 0, "?"), ("token", 1, 3, "c"), ("final", 1, 4, "abc"),
        ("done", 1, 5, None)]


async def test_a_client_that_never_reads_costs_a_bounded_buffer_and_misses_nothing(
        gw_config, rds):
    config = gw_config()
    job_id = uuid7()
    stream = config.job_keys(job_id).stream
    rds.set(OWNER_PREFIX + job_id, "alice")
    many = 0
    async with gateway_running(config) as (handle, client):
        async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=bearer()) as resp:
            lines = resp.aiter_lines()
            assert (await lines.__anext__()).startswith("retry:")
            relay = handle.gateway.relay
            (subscription,) = [s for state in relay._states for subs in
                               state.subscriptions.values() for s in subs]
            # Entries until the client's socket (and the kernel's buffers, which grow
            # to megabytes on loopback) takes no more: the reader's write is refused.
            with trio.fail_after(60):
                while not subscription.behind:
                    pipe = rds.pipeline()
                    for n in range(many, many + 1000):
                        pipe.xadd(stream, {"event": "token", "jobId": job_id,
                                           "userId": "alice", "sessionId": "s",
                                           "attempt": 1, "seq": n, "ts": 0,
                                           "data": json.dumps({"text": "x" * 200})})
                    pipe.execute()
                    many += 1000
                    with trio.move_on_after(1):
                        while not subscription.behind:  # noqa: ASYNC110 (in-process state)
                            await trio.sleep(0.01)
            # Held for it: what one write of one read left unsent, never more.
            body = inspect.getclosurevars(subscription.take).nonlocals["body"]
            assert len(body.direct.pending) <= READ_COUNT * 600
            rds.xadd(stream, {"event": "done", "jobId": job_id, "userId": "alice",
                              "sessionId": "s", "attempt": 1, "seq": many, "ts": 0,
                              "data": json.dumps({"status": "completed", "partial": False})})
            rest = [line async for line in lines]
    seqs = [e["data"]["seq"] for e in parse_sse("\n".join(rest))]
    assert seqs == list(range(many + 1))


async def test_history_lists_sessions_and_delete_forgets_one(gw_config, llm, rds):
    config = gw_config()
    llm.default = Reply(tokens=("Fine", "."))
    async with worker_running(config), gateway_running(config) as (_, client):
        for session, message in (("s-a", "First?"), ("s-a", "Second?"), ("s-b", "Other")):
            accepted = await client.post("/v1/chat", json={"sessionId": session,
                                                           "message": message},
                                         headers=bearer("hist-user"))
            await read_events(client, accepted.json()["jobId"], user="hist-user")
        sessions = (await client.get("/v1/sessions", headers=bearer("hist-user"))).json()
        assert sorted(s["sessionId"] for s in sessions["sessions"]) == ["s-a", "s-b"]
        turns = (await client.get("/v1/sessions/s-a/messages",
                                  headers=bearer("hist-user"))).json()["messages"]
        assert [(t["role"], t["content"]) for t in turns] == [
            ("user", "First?"), ("assistant", "Fine."), ("user", "Second?"),
            ("assistant", "Fine.")]
        foreign = await client.get("/v1/sessions/s-a/messages", headers=bearer("someone"))
        assert foreign.json()["messages"] == []
        deleted = await client.delete("/v1/sessions/s-a", headers=bearer("hist-user"))
        assert deleted.json()["deleted"] == 4
        after = (await client.get("/v1/sessions", headers=bearer("hist-user"))).json()
        assert [s["sessionId"] for s in after["sessions"]] == ["s-b"]
        # The worker reads no history of the deleted session for its next turn.
        accepted = await client.post("/v1/chat", json={"sessionId": "s-a", "message": "Again"},
                                     headers=bearer("hist-user"))
        await read_events(client, accepted.json()["jobId"], user="hist-user")
    assert [m["content"] for m in llm.calls[-1].messages if m["role"] == "user"] == ["Again"]


async def test_a_config_the_gateway_cannot_serve_is_refused_by_name(gw_config, monkeypatch,
                                                                     tmp_path):
    cases = [
        ({"CHAT_ACTORS__REDIS__CLUSTER": "true"}, None, PermanentError,
         "redis.cluster = true needs a Redis Cluster"),
        ({}, "too-short", ConfigError, r"gateway.jwt_secret_env: \$CHAT_ACTORS_JWT_SECRET must"),
        ({}, "", ConfigError, r"gateway.jwt_secret_env"),
        ({"CHAT_ACTORS__GATEWAY__JWT_ALGORITHM": "RS256"}, None, ConfigError,
         "gateway.jwt_public_key_file: RS256 needs"),
        ({"CHAT_ACTORS__GATEWAY__JWT_ALGORITHM": "RS256",
          "CHAT_ACTORS__GATEWAY__JWT_PUBLIC_KEY_FILE": str(tmp_path / "key.pem")}, None,
         ConfigError, "gateway.jwt_audience: RS256 needs the audience"),
        ({"CHAT_ACTORS__GATEWAY__JWT_ALGORITHM": "RS256", "CHAT_ACTORS__GATEWAY__JWT_AUDIENCE": "app",
          "CHAT_ACTORS__GATEWAY__JWT_PUBLIC_KEY_FILE": str(tmp_path / "absent.pem")}, None,
         ConfigError, "gateway.jwt_public_key_file: No such file"),
    ]
    for environ, secret_value, error, message in cases:
        config = gw_config(**environ)
        if secret_value is not None:
            monkeypatch.setenv("CHAT_ACTORS_JWT_SECRET", secret_value)
        with pytest.raises(error, match=message):
            await run_gateway(config, handle_signals=False)
        monkeypatch.setenv("CHAT_ACTORS_JWT_SECRET", SECRET)


async def test_closing_sends_open_streams_a_last_retry(gw_config):
    config = gw_config()
    job_id = uuid7()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(partial(run_gateway, config, stop=stop,
                                             handle_signals=False))
        await handle.gateway.reads.remember_owner(OWNER_PREFIX + job_id, "alice", 60)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.port}",
                                     timeout=30) as client:
            async with client.stream("GET", f"/v1/jobs/{job_id}/events",
                                     headers=bearer()) as response:
                lines = response.aiter_lines()
                assert (await lines.__anext__()).startswith("retry: 3000")
                ready = await client.get("/readyz")
                assert ready.status_code == 200
                stop.set()
                rest = [line async for line in lines]
    assert "retry: 1000" in rest


async def _get_events(port: int, job_id: str, last: str | None, drop_after: int
                      ) -> tuple[int, list[dict], bool]:
    """GET the events over a bare HTTP/1.0 socket (httpx's nested stream generators
    cannot be dropped mid-body under Trio without leaking), hanging up after
    `drop_after` events: (status, events, whether it reached `done`)."""
    headers = bearer() | ({"Last-Event-ID": last} if last else {})
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET /v1/jobs/{job_id}/events HTTP/1.0\r\nHost: t\r\n"
                              f"{head}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            piece = await stream.receive_some()
            assert piece, f"the gateway closed the connection before answering: {data!r}"
            data += piece
        top, _, body = data.partition(b"\r\n\r\n")
        status = int(top.split()[1])
        events: list[dict] = []
        while True:
            while b"\n\n" in body:
                block, body = body.split(b"\n\n", 1)
                events += parse_sse(block.decode() + "\n\n")
                if events and events[-1]["event"] == "done":
                    return status, events, True  # the stream's end (a client stops here)
                if len(events) >= drop_after:
                    return status, events, False  # hang up mid-stream
            piece = await stream.receive_some()
            if not piece:
                return status, events, True
            body += piece


async def _follow(port: int, job_id: str, rng: random.Random) -> list[dict]:
    """Read a job's events as a flaky client: drop the connection after a random number
    of events (sometimes at once, twice in a row, or after `done`), resume each time
    with the last id seen; stop at 204, or at `done` half the time."""
    seen: list[dict] = []
    while True:
        last = seen[-1]["id"] if seen else None
        status, events, ended = await _get_events(
            port, job_id, last, rng.choice([0, 0, 1, 2, 3, 5, 1000]))
        if status == 204:
            return seen
        assert status == 200
        seen += events
        if ended and seen and seen[-1]["event"] == "done" and rng.random() < 0.5:
            return seen


async def test_resume_fuzz_flaky_clients_assemble_every_answer_exactly(gw_config, llm, rds):
    """Many jobs, each followed by a client that drops and resumes at random points:
    the text assembled by the contract's rules equals `final.text`, no entry is seen
    twice and none is missed."""
    # Forty clients of one user at once: over gateway.max_streams_per_user's default.
    config = gw_config(CHAT_ACTORS__JOBS__MAX_IN_FLIGHT="64",
                       CHAT_ACTORS__GATEWAY__MAX_STREAMS_PER_USER="100")
    llm.default = Reply(tokens=tuple(f"t{n} " for n in range(12)), token_delay_s=0.01)
    jobs = int(os.environ.get("FUZZ_JOBS", "500"))
    results: dict[str, list[dict]] = {}
    async with worker_running(config), gateway_running(config) as (handle, client):
        limiter = trio.CapacityLimiter(40)

        async def one(n: int) -> None:
            async with limiter:
                accepted = await client.post("/v1/chat", json={
                    "sessionId": f"fz-{n}", "message": f"question {n}"}, headers=bearer())
                job_id = accepted.json()["jobId"]
                results[job_id] = await _follow(handle.port, job_id, random.Random(n))

        async with trio.open_nursery() as nursery:
            for n in range(jobs):
                nursery.start_soon(one, n)
    assert len(results) == jobs
    for job_id, seen in results.items():
        ids = [e["id"] for e in seen]
        assert len(ids) == len(set(ids)), job_id  # nothing twice
        stored = [entry_id for entry_id, _ in rds.xrange(config.job_keys(job_id).stream)]
        assert ids == stored, job_id  # nothing missed, in order
        attempt, text = 0, ""
        for event in seen:
            if event["event"] == "started" and event["data"]["attempt"] > attempt:
                attempt, text = event["data"]["attempt"], ""
            elif event["event"] == "token":
                text += event["data"]["text"]
        final = next(e for e in seen if e["event"] == "final")
        assert text == final["data"]["text"] == "".join(f"t{n} " for n in range(12))
        assert seen[-1]["event"] == "done"


async def test_hostile_http_input_gets_a_clear_answer_and_the_gateway_goes_on(gw_config):
    """Oversize and malformed bodies, hostile path ids and headers: each a 4xx naming
    the problem (never a 500), and the gateway still serves afterwards."""
    config = gw_config(CHAT_ACTORS__GATEWAY__DEV_SIGNIN="true",
                       CHAT_ACTORS__GATEWAY__STREAM_WAIT_S="0.2")
    async with gateway_running(config) as (handle, client):
        # 3 MB declared: refused from the headers (a raw connection: httpx would be left
        # holding the rest of its body).
        head = (b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nAuthorization: " +
                bearer()["Authorization"].encode() + b"\r\nContent-Length: 3145728\r\n\r\n")
        with trio.fail_after(20):
            assert (await raw_status(handle.port, head, [b"{" + b" " * 4096])).startswith(
                b"HTTP/1.1 413")
        for body in (b"\xff\xfe", b"null", b'"text"', b"[" * 5000 + b"]" * 5000,
                     b'{"sessionId": "s", "message": "a\\u0000b"}'):
            response = await client.post("/v1/chat", content=body, headers=bearer())
            assert response.status_code == 400, body[:20]
            assert response.json()["error"]["message"], body[:20]
        for job_id in ("a" * 129, "..%2F..%2Fetc", "j%00x", "%E2%80%AE"):
            for method, path in (("GET", "events"), ("POST", "cancel")):
                response = await client.request(method, f"/v1/jobs/{job_id}/{path}",
                                                headers=bearer())
                assert response.status_code == 404, (job_id, path)
        long_id = await client.get(f"/v1/sessions/{'s' * 200}/messages", headers=bearer())
        assert long_id.status_code == 404
        for header in ("Bearer", "Basic abc", "Bearer a.b.c", "Bearer " + "x" * 10000):
            response = await client.get("/v1/sessions", headers={"Authorization": header})
            assert response.status_code == 401, header[:20]
        for body in (b"", b"[]", b'{"user": 5}', b'{"user": ""}', b"\xff"):
            response = await client.post("/v1/dev/token", content=body)
            assert response.status_code == 400, body
        assert (await client.get("/healthz")).status_code == 200
        ok = await client.get("/v1/sessions", headers=bearer(f"h-{uuid.uuid4().hex}"))
        assert ok.status_code == 200
