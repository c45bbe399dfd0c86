"""Claims in batches (actors/claims.py, Postgres.claim_many): one round trip claims
every job asking at once, with each job's own outcome and history, as one claim each
would (contract 6.1)."""

from __future__ import annotations

import uuid
from functools import partial

import pytest
import trio

from actors.adapters.postgres import Postgres
from actors.claims import Claims, PendingClaim, run_claims
from actors.errors import TransientError
from messages.ports import (
    AlreadyTerminal,
    Claimed,
    ClaimOrder,
    Handed,
    LeasedElsewhere,
    OwnedByAnotherUser,
    TokenCounts,
)


def order(job_id: str, user: str = "u", session: str = "s") -> ClaimOrder:
    return ClaimOrder(job_id=job_id, user_id=user, session_id=session, trace_id="t",
                      mode="gen", model="m", provider="p")


def say(db, job_id: str, user: str, session: str, *turns: str) -> None:
    for role, text in zip(("user", "assistant") * len(turns), turns, strict=False):
        db.execute("INSERT INTO llm_messages (job_id, session_id, user_id, role, content) "
                   "VALUES (%s, %s, %s, %s, %s)", (job_id, session, user, role, text))


async def test_one_batch_gives_each_job_the_outcome_and_history_its_own_claim_would(pg, db):
    tag = uuid.uuid4().hex[:8]
    new, done, live, theirs, rejected, expired, fresh = (f"c-{tag}-{n}" for n in range(7))
    alice, bob = f"alice-{tag}", f"bob-{tag}"
    rows = [(done, alice, "completed", 2, None, None, True),
            (live, alice, "running", 1, "w-other", "now() + interval '1 hour'", False),
            (theirs, bob, "running", 1, None, None, False),
            (rejected, alice, "rejected", 1, None, None, False),
            (expired, alice, "running", 3, "w-dead", "now() - interval '1 second'", False)]
    for job_id, user, status, attempt, owner, until, cut in rows:
        db.execute(f"INSERT INTO llm_jobs (job_id, user_id, session_id, status, attempt, "
                   f"lease_owner, lease_until, partial) VALUES (%s, %s, 's1', %s, %s, %s, "
                   f"{until or 'NULL'}, %s)", (job_id, user, status, attempt, owner, cut))
    say(db, f"old1-{tag}", alice, "s1", "q1", "a1")
    say(db, f"old2-{tag}", alice, "s1", "q2", "a2")
    say(db, expired, alice, "s1", "its own question")  # a job never sees its own turns
    say(db, f"old3-{tag}", alice, "s2", "other session")
    say(db, f"old4-{tag}", bob, "s1", "bob's own")

    results = await pg.claim_many(
        [order(new, alice, "s1"), order(done, alice, "s1"), order(live, alice, "s1"),
         order(theirs, alice, "s1"), order(rejected, alice, "s1"), order(expired, alice, "s1"),
         order(fresh, alice, "s2")], lease_holder="w-me", lease_s=30, history_limit=3)

    assert [type(r) for r in results] == [Claimed, AlreadyTerminal, LeasedElsewhere,
                                          OwnedByAnotherUser, Claimed, Claimed, Claimed]
    first, finished, leased, _, over, again, other = results
    assert isinstance(first, Claimed) and first.attempt == 1 and not first.over_rejected
    # The last three turns of alice's session s1, oldest first...
    assert [t.content for t in first.history] == ["q2", "a2", "its own question"]
    assert finished == AlreadyTerminal("completed", 2, True)
    assert leased == LeasedElsewhere("w-other")
    assert isinstance(over, Claimed) and over.over_rejected and over.attempt == 2
    assert isinstance(again, Claimed) and again.attempt == 4 and not again.over_rejected
    assert [t.content for t in again.history] == ["a1", "q2", "a2"]  # ...never a job's own
    assert isinstance(other, Claimed) and [t.content for t in other.history] == ["other session"]
    owners = dict(db.execute("SELECT job_id, lease_owner FROM llm_jobs WHERE job_id = ANY(%s)",
                             ([new, done, live, theirs, rejected, expired, fresh],)).fetchall())
    assert owners == {new: "w-me", done: None, live: "w-other", theirs: None,
                      rejected: "w-me", expired: "w-me", fresh: "w-me"}
    with pytest.raises(ValueError, match="twice"):
        await pg.claim_many([order(new), order(new)], lease_holder="w-me", lease_s=30)


class Counting:
    """The real store, counting its round trips."""

    def __init__(self, pg: Postgres, fail: bool = False) -> None:
        self.pg, self.fail, self.batches = pg, fail, []

    async def claim_many(self, orders, **kwargs):
        self.batches.append([o.job_id for o in orders])
        if self.fail:
            raise TransientError("postgres: away")
        return await self.pg.claim_many(orders, **kwargs)


async def claim_all(store, orders):
    send, receive = trio.open_memory_channel[PendingClaim](1024)
    claims, results, errors = Claims(send), {}, {}

    async def one(o: ClaimOrder) -> None:
        try:
            got = await claims.claim(o)
            results.setdefault(o.job_id, []).append(got)
        except TransientError as exc:
            errors[o.job_id] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(run_claims, receive, store, lease_holder="w-me",
                                   lease_s=30, history_limit=5))
        async with trio.open_nursery() as jobs:
            for o in orders:
                jobs.start_soon(one, o)
        nursery.cancel_scope.cancel()
    return results, errors


async def test_jobs_claiming_at_once_share_one_round_trip_and_a_duplicate_waits(pg):
    tag = uuid.uuid4().hex[:8]
    ids = [f"b-{tag}-{n}" for n in range(40)]
    store = Counting(pg)
    results, errors = await claim_all(store, [order(i, session=i) for i in [*ids, ids[7]]])
    assert not errors
    assert sorted(store.batches[0]) == sorted(ids)  # all forty in the first round trip
    assert store.batches[1:] == [[ids[7]]]  # the duplicate in the next
    assert all(isinstance(results[i][0], Claimed) and results[i][0].attempt == 1 for i in ids)
    assert len(results[ids[7]]) == 2
    # The duplicate delivery finds the lease this worker took: it waits, as before.
    assert sorted(map(type, results[ids[7]]), key=str) == [Claimed, LeasedElsewhere]


async def test_a_batch_that_fails_fails_each_of_its_claims(pg):
    tag = uuid.uuid4().hex[:8]
    ids = [f"f-{tag}-{n}" for n in range(5)]
    store = Counting(pg, fail=True)
    results, errors = await claim_all(store, [order(i) for i in ids])
    assert not results and set(errors) == set(ids)
    assert len(store.batches) == 1


async def test_a_release_hands_the_answer_to_the_next_claim_and_an_unreadable_one_is_dropped(
        pg, db):
    """What a drain hands back (llm_jobs.handed) reaches the next attempt's claim; it
    lands only for the attempt holding the lease; a value of another shape (written by
    something else) is not carried on."""
    job_id = f"h-{uuid.uuid4().hex[:8]}"
    (first,) = await pg.claim_many([order(job_id)], lease_holder="w1", lease_s=60)
    assert isinstance(first, Claimed) and first.handed is None
    stale = Handed(attempt=7, text="not this attempt's")
    await pg.release_lease(job_id=job_id, lease_holder="w1", handed=stale)
    assert db.execute("SELECT status, handed FROM llm_jobs WHERE job_id = %s",
                      (job_id,)).fetchone() == ("running", None)  # refused: wrong attempt
    handed = Handed(attempt=1, text="So far", reason=None,
                    usage=TokenCounts(prompt=12, completion=2), cost_usd=0.001)
    await pg.release_lease(job_id=job_id, lease_holder="w1", handed=handed)
    (second,) = await pg.claim_many([order(job_id)], lease_holder="w2", lease_s=60)
    assert isinstance(second, Claimed) and (second.attempt, second.handed) == (2, handed)
    await pg.release_lease(job_id=job_id, lease_holder="w2")  # nothing new: kept as it was
    assert db.execute("SELECT handed FROM llm_jobs WHERE job_id = %s",
                      (job_id,)).fetchone()[0]["text"] == "So far"
    db.execute("UPDATE llm_jobs SET handed = %s WHERE job_id = %s",
               ('{"attempt": "two", "text": 5}', job_id))
    (third,) = await pg.claim_many([order(job_id)], lease_holder="w3", lease_s=60)
    assert isinstance(third, Claimed) and (third.attempt, third.handed) == (3, None)
