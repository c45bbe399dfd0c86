"""One client's input stays that client's problem (issue 35), on the real stack: bodies
bounded in size and time before they are read, a 503 that is a refusal (the request
never runs, a retry with its Idempotency-Key pays once), identities and idempotency
keys that no two users share, and sends that do not queue behind each other."""

from __future__ import annotations

import hashlib
import os
import signal
import uuid
from collections.abc import Callable

import pytest
import trio
import trio.testing

from actors.adapters.kafka import NotDelivered, Producer
from actors.adapters.postgres import Postgres
from gateway.auth import user_id_of
from messages.ports import AlreadyTerminal, Claimed
from tests.helpers import gateway_running, job_row, raw_status, wait_calls, worker_running
from tests.scripted_llm import Reply
from tests.test_gateway import bearer, parse_sse, read_events


def test_no_claim_can_be_taken_verbatim_as_another_claims_hashed_id():
    bob = user_id_of("bob@example.org")
    forged = "h-" + hashlib.sha256(b"bob@example.org").hexdigest()[:32]
    assert forged == bob  # the claim an attacker would choose...
    assert user_id_of(forged) != bob  # ...is hashed in turn, so it is not Bob
    assert user_id_of(forged).startswith("h-") and len(user_id_of(forged)) == 34
    assert user_id_of("h-") != "h-" and user_id_of("alice") == "alice"


async def test_a_crafted_claim_does_not_see_the_users_history_it_imitates(gw_config, db):
    bob = user_id_of("bob@example.org")
    async with gateway_running(gw_config()) as (_, client):  # it migrates the tables
        db.execute("INSERT INTO llm_messages (job_id, session_id, user_id, role, content) "
                   "VALUES (%s, 's-bob', %s, 'user', 'my secret question')",
                   (f"j-{uuid.uuid4().hex}", bob))
        mine = (await client.get("/v1/sessions", headers=bearer("bob@example.org"))).json()
        assert [s["sessionId"] for s in mine["sessions"]] == ["s-bob"]
        forged = "h-" + hashlib.sha256(b"bob@example.org").hexdigest()[:32]
        theirs = (await client.get("/v1/sessions", headers=bearer(forged))).json()
        assert theirs["sessions"] == []
        turns = await client.get("/v1/sessions/s-bob/messages", headers=bearer(forged))
        assert turns.json()["messages"] == []


async def test_idempotency_keys_of_users_whose_ids_hold_a_colon_never_collide(gw_config):
    body = {"sessionId": "s-idem", "message": "mine"}
    async with gateway_running(gw_config()) as (_, client):
        acme = await client.post("/v1/chat", json=body,
                                 headers=bearer("acme") | {"Idempotency-Key": "bob:k1"})
        acme_bob = await client.post("/v1/chat", json=body,
                                     headers=bearer("acme:bob") | {"Idempotency-Key": "k1"})
        assert acme.status_code == acme_bob.status_code == 202
        assert acme.json()["jobId"] != acme_bob.json()["jobId"]
        # Each one's own repeat still finds its own job.
        again = await client.post("/v1/chat", json=body,
                                  headers=bearer("acme") | {"Idempotency-Key": "bob:k1"})
        assert again.json()["jobId"] == acme.json()["jobId"]


async def test_a_body_is_bounded_in_size_and_time_before_it_is_read(gw_config):
    config = gw_config(CHAT_ACTORS__GATEWAY__MAX_BODY_BYTES="65536",
                       CHAT_ACTORS__GATEWAY__BODY_TIMEOUT_S="0.5",
                       CHAT_ACTORS__GATEWAY__DEV_SIGNIN="true")
    auth = bearer("body-user")["Authorization"].encode()
    async with gateway_running(config) as (handle, client):
        port = handle.port
        # A declared 400 MB body: refused from its headers, without one byte more read
        # (the connection never sends the rest; an answer only after reading it all
        # would never come).
        for path in (b"/v1/chat", b"/v1/dev/token", b"/v1/jobs/x/cancel", b"/v1/sessions"):
            head = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth +
                    b"\r\nContent-Type: application/json\r\nContent-Length: 400000000\r\n\r\n")
            with trio.fail_after(20):
                status = await raw_status(port, head, [b"{" * 1024])
            assert status.startswith(b"HTTP/1.1 413"), (path, status)
        # No length declared (chunked): read up to the limit, then refused.
        head = (b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth +
                b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        with trio.fail_after(20):
            status = await raw_status(port, head, [b"1000\r\n" + b" " * 4096 + b"\r\n"] * 30)
        assert status.startswith(b"HTTP/1.1 413"), status
        # A few bytes and then nothing (slowloris): refused once the time budget is out.
        head = (b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth +
                b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        with trio.fail_after(20):
            status = await raw_status(port, head, [b'{"sessionId"'])
        assert status.startswith(b"HTTP/1.1 408")
        # The gateway goes on: a well-formed request of the same user is served.
        fine = await client.post("/v1/chat", json={"sessionId": "s", "message": "hi"},
                                 headers=bearer("body-user"))
        assert fine.status_code == 202


async def test_sends_do_not_queue_behind_each_other_while_the_broker_is_stalled(stack):
    """With the broker frozen, a send waiting for its ack holds no other send: a second
    one gives up on its own deadline while the first still waits, and the first is
    delivered once the broker thaws. (Behind one lock the second could not even start
    until the first was done.)"""
    producer = Producer(bootstrap=stack.kafka.url, extra={})
    topic = f"t-stall-{uuid.uuid4().hex[:8]}"
    outcomes: list[tuple[str, str]] = []

    async def send(name: str, timeout_s: float) -> None:
        try:
            await producer.send(topic, name.encode(), timeout_s=timeout_s)
            outcomes.append((name, "delivered"))
        except NotDelivered:
            outcomes.append((name, "not delivered"))

    try:
        await send("warm-up", 30)  # connected, the topic known
        os.kill(stack.kafka.pid, signal.SIGSTOP)
        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send, "first", 60)
                    await trio.testing.wait_all_tasks_blocked()
                    await send("second", 1)  # its own deadline, the first still waiting
                    os.kill(stack.kafka.pid, signal.SIGCONT)
        finally:
            os.kill(stack.kafka.pid, signal.SIGCONT)
        assert outcomes == [("warm-up", "delivered"), ("second", "not delivered"),
                            ("first", "delivered")]
    finally:
        await producer.close()


async def test_a_503_is_a_refusal_and_a_retry_with_the_same_key_runs_once(gw_config, stack,
                                                                          llm, db):
    """With the broker frozen past the gateway's produce timeout the POST answers 503;
    the message still reaches the broker when it thaws, yet never runs. The page's
    retry with the same Idempotency-Key is a new job, and the only one the vendor sees."""
    config = gw_config(CHAT_ACTORS__GATEWAY__PRODUCE_TIMEOUT_S="1")
    llm.default = Reply(tokens=("fine",))
    user, session = f"fence-{uuid.uuid4().hex[:8]}", "s-fence"
    key = {"Idempotency-Key": f"q-{uuid.uuid4().hex}"}
    async with gateway_running(config) as (_, client):
        warm = await client.post("/v1/chat", json={"sessionId": "s-warm", "message": "warm"},
                                 headers=bearer(user))
        assert warm.status_code == 202
        os.kill(stack.kafka.pid, signal.SIGSTOP)
        try:
            refused = await client.post("/v1/chat", json={"sessionId": session,
                                                          "message": "the refused one"},
                                        headers=bearer(user) | key)
        finally:
            os.kill(stack.kafka.pid, signal.SIGCONT)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "not_accepted"
        (refused_id,) = [row[0] for row in db.execute(
            "SELECT job_id FROM llm_jobs WHERE user_id = %s AND status = 'cancelled'",
            (user,)).fetchall()]
        fence = job_row(db, refused_id)
        assert fence is not None and fence["error"].startswith("refused: ")
        retry = await client.post("/v1/chat", json={"sessionId": session,
                                                    "message": "the retry"},
                                  headers=bearer(user) | key)
        assert retry.status_code == 202 and retry.json()["jobId"] != refused_id
        again = await client.post("/v1/chat", json={"sessionId": session,
                                                    "message": "the retry"},
                                  headers=bearer(user) | key)
        assert again.json()["jobId"] == retry.json()["jobId"]  # a repeat: the same job
        async with worker_running(config):
            # The refused request was delivered after all (the broker read it when it
            # thawed): the worker ends it at once, unrun, with a `done` of its own.
            status, text = await read_events(client, refused_id, user=user)
            assert status == 200
            assert [e["event"] for e in parse_sse(text)] == ["done"]
            status, text = await read_events(client, retry.json()["jobId"], user=user)
            assert parse_sse(text)[-1]["data"]["status"] == "completed"
            await wait_calls(llm, lambda calls: len(calls) >= 2)
    asked = [call.messages[-1]["content"] for call in llm.calls]
    assert sorted(asked) == ["the retry", "warm"]
    assert (job_row(db, refused_id) or {}).get("status") == "cancelled"


async def test_a_fence_and_a_claim_exclude_each_other(stack):
    pg = Postgres(dsn=stack.postgres.url, pool_size=1)
    try:
        claimed, fenced = f"j-{uuid.uuid4().hex}", f"j-{uuid.uuid4().hex}"
        first = await pg.claim(job_id=claimed, user_id="u", session_id="s", trace_id="t",
                               mode="gen", model="m", provider="p", lease_holder="w",
                               lease_s=30)
        assert isinstance(first, Claimed)
        # A worker holds it: the gateway learns the request was accepted after all.
        assert not await pg.fence_refused(job_id=claimed, user_id="u", session_id="s",
                                          reason="x")
        assert await pg.fence_refused(job_id=fenced, user_id="u", session_id="s", reason="x")
        late = await pg.claim(job_id=fenced, user_id="u", session_id="s", trace_id="t",
                              mode="gen", model="m", provider="p", lease_holder="w",
                              lease_s=30)
        assert late == AlreadyTerminal("cancelled", 1, False, ran=False)
    finally:
        pg.close()


def _ask_through_a_paused_broker(url: str, kafka_pid: int, refused: Callable[[], bool]) -> str:
    """A person asks while the broker is paused; it thaws once the gateway has refused
    the question (503, fenced); the page's retry gets the answer. The answer's text."""
    from selenium.webdriver.common.by import By

    from tests.test_browser import _signed_in, _wait

    with _signed_in(url) as driver:
        os.kill(kafka_pid, signal.SIGSTOP)
        try:
            driver.find_element(By.ID, "message").send_keys("Only once")
            driver.find_element(By.ID, "send").click()
            _wait(refused, what="the refused first try")
        finally:
            os.kill(kafka_pid, signal.SIGCONT)
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".assistant[data-status]"),
              what="the answer of the retry")
        return driver.find_elements(By.CSS_SELECTOR, ".assistant .answer")[-1].text


@pytest.mark.skipif(not (os.path.exists("/usr/bin/chromium")
                         and os.path.exists("/usr/bin/chromedriver")),
                    reason="not run: needs Debian's chromium and chromium-driver (bin/chat-actors "
                           "test installs them when it runs as root)")
async def test_the_page_retries_a_refused_question_and_it_runs_once(gw_config, stack, llm, db):
    config = gw_config(CHAT_ACTORS__GATEWAY__DEV_SIGNIN="true",
                       CHAT_ACTORS__GATEWAY__PRODUCE_TIMEOUT_S="1")
    llm.default = Reply(tokens=("answered ", "once"))
    since = db.execute("SELECT now()").fetchone()[0]

    def refused() -> bool:
        return db.execute("SELECT count(*) FROM llm_jobs WHERE status = 'cancelled' AND "
                          "attempt = 0 AND created_at >= %s", (since,)).fetchone()[0] == 1

    async with worker_running(config), gateway_running(config) as (handle, _):
        text = await trio.to_thread.run_sync(_ask_through_a_paused_broker,
                                             f"http://127.0.0.1:{handle.port}/",
                                             stack.kafka.pid, refused)
    assert text.strip() == "answered once"
    assert [call.messages[-1]["content"] for call in llm.calls] == ["Only once"]
