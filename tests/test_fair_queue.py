"""The uploads' turns (actors/fair_queue.py): round-robin over owners, one turn per owner
at a time, and a wait that ends (timed out or cancelled) leaves nothing held."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from actors.fair_queue import FairQueue, NoTurn


async def test_an_owner_whose_turn_ends_goes_behind_every_owner_waiting_meanwhile():
    queue = FairQueue(workers=1)
    order: list[str] = []
    go = trio.Event()

    async def job(owner: str, label: str) -> None:
        async with queue.turn(owner, wait_s=60):
            order.append(label)
            await go.wait()

    async with trio.open_nursery() as nursery:
        for owner, label in [("ann", "ann-1"), ("ann", "ann-2"), ("ann", "ann-3"),
                             ("ben", "ben-1"), ("cat", "cat-1")]:
            nursery.start_soon(job, owner, label)
            await trio.testing.wait_all_tasks_blocked()
        assert (order, queue.waiting()) == (["ann-1"], 4)
        go.set()
    assert order == ["ann-1", "ben-1", "cat-1", "ann-2", "ann-3"]


async def test_one_owners_turns_never_overlap_while_others_use_the_free_workers():
    queue = FairQueue(workers=3)
    held = trio.Event()
    inside: list[str] = []

    async def job(owner: str) -> None:
        async with queue.turn(owner, wait_s=60):
            inside.append(owner)
            await held.wait()

    async with trio.open_nursery() as nursery:
        for owner in ("ann", "ann", "ann", "ben"):
            nursery.start_soon(job, owner)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(inside) == ["ann", "ben"] and queue.running() == 2
        held.set()


async def test_a_turn_not_come_in_time_is_withdrawn_and_a_cancelled_wait_holds_nothing(
        autojump_clock):
    queue = FairQueue(workers=1)
    release = trio.Event()

    async def holder(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with queue.turn("ann", wait_s=1):
            task_status.started()
            await release.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(holder)
        started = trio.current_time()
        with pytest.raises(NoTurn, match="no turn within 30 s"):
            async with queue.turn("ben", wait_s=30):
                pytest.fail("ben's turn came while ann held the only worker")
        assert trio.current_time() - started == pytest.approx(30)
        with trio.move_on_after(5):  # a client that hangs up while waiting
            async with queue.turn("cat", wait_s=60):
                pytest.fail("cat's turn came while ann held the only worker")
        assert queue.waiting() == 0
        release.set()
    # Nothing was left holding the worker: the next turn comes at once.
    with trio.fail_after(0.001):
        async with queue.turn("dan", wait_s=60):
            assert queue.running() == 1
