"""The lease keeper: one batched renewal per period for every job the worker holds."""

from __future__ import annotations

from functools import partial

import trio

from actors.leases import LeaseKeeper
from tests.fakes import FakeStore as Store


async def test_all_held_leases_are_renewed_together_every_third_of_a_lease(autojump_clock):
    keeper, store = LeaseKeeper(), Store()
    for job in ("a", "b", "c"):
        keeper.hold(job)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(keeper.run, store, lease_holder="w", lease_s=30))
        await trio.sleep(25)
        keeper.drop("b")
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert [(ids, round(at)) for ids, at in store.renewals] == [
        (["a", "b", "c"], 10), (["a", "b", "c"], 20), (["a", "c"], 30)]


async def test_a_lease_taken_over_elsewhere_is_dropped_and_an_outage_retried(autojump_clock):
    keeper, store = LeaseKeeper(), Store()
    keeper.hold("mine")
    keeper.hold("lost")
    store.taken = {"lost"}
    store.down = True
    await keeper.renew(store, lease_holder="w", lease_s=30)
    assert keeper.held == {"mine", "lost"}  # a failed renewal changes nothing; next period retries
    store.down = False
    await keeper.renew(store, lease_holder="w", lease_s=30)
    assert keeper.held == {"mine"}
    await keeper.renew(store, lease_holder="w", lease_s=30)
    assert store.renewals[-1][0] == ["mine"]


async def test_nothing_held_means_no_query(autojump_clock):
    keeper, store = LeaseKeeper(), Store()
    await keeper.renew(store, lease_holder="w", lease_s=30)
    assert store.renewals == []


async def test_postgres_renews_the_leases_this_worker_holds_and_loses_only_those_taken_over(stack, db):
    import uuid

    from actors.adapters.postgres import Postgres
    from messages.ports import Claimed

    pg = Postgres(dsn=stack.postgres.url, pool_size=2)
    await pg.migrate()
    jobs = [f"lease-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    try:
        for job_id, owner in zip(jobs, ("w1", "w1", "w2", "w1"), strict=True):
            claim = await pg.claim(job_id=job_id, user_id="u", session_id="s", trace_id="t",
                                   mode="gen", model="m", provider="p", lease_holder=owner,
                                   lease_s=5)
            assert isinstance(claim, Claimed)
        # w1 ended the fourth job (its terminal row landed) while the renewal was on its way.
        db.execute("UPDATE llm_jobs SET status = 'completed' WHERE job_id = %s", (jobs[3],))
        before = dict(db.execute("SELECT job_id, lease_until FROM llm_jobs WHERE job_id = ANY(%s)",
                                 (jobs,)).fetchall())
        still_mine = await pg.renew_leases(job_ids=jobs, lease_holder="w1", lease_s=600)
        # The job w2 holds is lost to w1; the one w1 ended is not (it must not be stopped
        # while it sends its done), and is not renewed.
        assert still_mine == {jobs[0], jobs[1], jobs[3]}
        after = dict(db.execute("SELECT job_id, lease_until FROM llm_jobs WHERE job_id = ANY(%s)",
                                (jobs,)).fetchall())
        assert all(after[j] > before[j] for j in jobs[:2])
        assert after[jobs[2]] == before[jobs[2]] and after[jobs[3]] == before[jobs[3]]
    finally:
        pg.close()
