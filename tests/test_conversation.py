"""Conversation logic with fakes of our own ports and the autojump MockClock:
timeouts (total, first token, idle) and cancel, in virtual time."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import pytest
import trio

import actors.job.finish as finish_module
from actors.job.conversation import run_conversation
from actors.registry import JobRegistry
from actors.worker import Worker
from config import load_config
from messages.mailboxes import EventEmitted, JobRejected
from messages.wire import ChatRequest
from tests.fakes import FakeStore, FlatPricing, NoEvents, Reply, ScriptedChat, WordCounting

CONFIG = load_config(environ={
    "CHAT_ACTORS__JOBS__TIMEOUT_S": "60",
    "CHAT_ACTORS__JOBS__FIRST_TOKEN_TIMEOUT_S": "10",
    "CHAT_ACTORS__JOBS__IDLE_TIMEOUT_S": "5",
    "CHAT_ACTORS__JOBS__LEASE_S": "30",
    "CHAT_ACTORS__LLM__RETRIES": "0",  # retries and fallbacks: tests/test_provider.py
})


def scripted(schedule: Sequence[tuple[float, str]]) -> ScriptedChat:
    """A model answering one call with tokens at the given virtual times (seconds after
    the call)."""
    return ScriptedChat([Reply(tokens=schedule, usage=(3, len(schedule)))])


async def run(chat: ScriptedChat, *, registry: JobRegistry | None = None,
              timeout_s: float | None = None, during=None, store: FakeStore | None = None,
              retriever=None, mode: str = "gen", pricing: FlatPricing | None = None,
              superseded: bool = False, postgres_away_s: float = 0.0,
              redis_slow_s: float = 0.0, order: list | None = None):
    """Run one job against fakes; return (events, the JobFinished record, virtual seconds)."""
    events: list = []
    records: list = []
    registry = registry or JobRegistry(tombstone_ttl_s=60)
    events_in, events_out = trio.open_memory_channel(100)
    records_in, records_out = trio.open_memory_channel(100)
    worker = Worker(config=CONFIG, worker_id="w1", store=store or FakeStore(), chat=chat,
                    pricing=pricing or FlatPricing(), tokens=WordCounting(),
                    events=events_in, records=records_in, event_log=NoEvents(),
                    registry=registry, retriever=retriever)

    async def sink(channel, into):
        async for message in channel:
            into.append(message)
            is_record = hasattr(message, "attempt")
            if order is not None:  # what each sink has taken, in order
                order.append("row" if is_record else message.body.EVENT)
            if message.receipt is not None:
                if is_record:  # a record for Postgres
                    await trio.sleep(postgres_away_s)  # the pg sink retries meanwhile
                    # As the pg sink says it when a later attempt holds the job.
                    message.receipt.superseded = superseded
                else:
                    await trio.sleep(redis_slow_s)
                message.receipt.set()
                if order is not None and not is_record:
                    order.append(f"{message.body.EVENT} written")

    request = ChatRequest(job_id="j1", user_id="alice", session_id="s1", message="hi",
                          timeout_s=timeout_s, mode=mode)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink, events_out, events)
        nursery.start_soon(sink, records_out, records)
        if during is not None:
            nursery.start_soon(during, registry)
        nursery.start_soon(partial(worker.leases.run, worker.store, lease_holder="w1",
                                   lease_s=CONFIG.jobs.lease_s,
                                   on_lost=partial(registry.stop, reason="superseded")))
        await run_conversation(request, worker)
        nursery.cancel_scope.cancel()
    elapsed = trio.current_time() - started
    bodies = [m.body for m in events if isinstance(m, EventEmitted)]
    assert len(records) == 1
    return bodies, records[0], elapsed


def kinds(bodies):
    return [b.EVENT for b in bodies]


async def test_a_job_completes_in_order(autojump_clock):
    chat = scripted([(1, "a"), (2, "b")])
    bodies, record, _ = await run(chat)
    assert kinds(bodies) == ["started", "token", "token", "final", "done"]
    assert record.status == "completed" and record.answer == "ab" and record.ttft_ms == 1000


@pytest.mark.parametrize("script", [[(1, "a")], [(1, "a"), (100, "b")]])
async def test_the_final_or_error_is_in_redis_before_the_row_is_terminal(script,
                                                                       autojump_clock):
    """A redelivery that finds the row terminal writes a `done` after what the stream
    holds: the `final` (or the timeout's `error`) must be there by then, or the resent
    `done` would take its seq and Redis would skip it."""
    order: list[str] = []
    await run(scripted(script), redis_slow_s=3, order=order)
    ending = "final" if len(script) == 1 else "error"
    assert order.index(f"{ending} written") < order.index("row")


async def test_total_timeout_keeps_the_partial_answer(autojump_clock):
    # Tokens every 4 s (under the 5 s idle limit) but 20 of them: the 60 s job limit hits.
    chat = scripted([(4 * i + 1, f"{i} ") for i in range(20)])
    store = FakeStore()
    bodies, record, elapsed = await run(chat, store=store)
    assert elapsed == pytest.approx(60, abs=0.1)
    assert len(store.renewals) >= 5  # the 30 s lease was renewed every 10 s while the job ran
    assert kinds(bodies)[-2:] == ["error", "done"]
    assert bodies[-2].code == "timeout" and bodies[-2].retryable
    assert (bodies[-1].status, bodies[-1].partial) == ("timeout", True)
    assert record.status == "timeout" and record.partial and record.answer.startswith("0 1 ")
    assert chat.cancelled


async def test_request_timeout_can_only_shorten_the_job(autojump_clock):
    chat = scripted([(4 * i + 1, "x") for i in range(20)])
    _, record, elapsed = await run(chat, timeout_s=9)
    assert elapsed == pytest.approx(9, abs=0.1) and record.status == "timeout"
    _, record, elapsed = await run(scripted([(4 * i + 1, "x") for i in range(20)]),
                                   timeout_s=600)
    assert elapsed == pytest.approx(60, abs=0.1)


async def test_no_first_token_in_time_is_a_first_token_timeout(autojump_clock):
    chat = scripted([(30, "late")])
    bodies, record, elapsed = await run(chat)
    assert elapsed == pytest.approx(10, abs=0.1)
    assert bodies[-2].code == "first_token_timeout"
    assert (bodies[-1].status, bodies[-1].partial) == ("timeout", False)
    assert record.ttft_ms is None and chat.cancelled


async def test_silence_after_tokens_is_an_idle_timeout(autojump_clock):
    chat = scripted([(1, "a"), (2, "b"), (20, "c")])
    bodies, record, elapsed = await run(chat)
    assert elapsed == pytest.approx(2 + 5, abs=0.1)
    assert bodies[-2].code == "idle_timeout"
    assert (bodies[-1].status, bodies[-1].partial) == ("timeout", True)
    assert record.answer == "ab"


async def test_an_owner_cancel_mid_stream_ends_the_job_as_cancelled(autojump_clock):
    chat = scripted([(i + 1, f"{i} ") for i in range(30)])

    async def cancel_at_3_5s(registry):
        await trio.sleep(3.5)
        assert registry.cancel("j1", "mallory", "x").value == "foreign"
        assert registry.cancel("j1", "alice", "stop").value == "cancelled"

    bodies, record, elapsed = await run(chat, during=cancel_at_3_5s)
    assert elapsed == pytest.approx(3.5, abs=0.1)
    assert kinds(bodies) == ["started", "token", "token", "token", "done"]
    assert (bodies[-1].status, bodies[-1].partial) == ("cancelled", True)
    assert record.answer == "0 1 2 " and chat.cancelled


async def test_a_tombstone_cancels_the_job_before_the_model_is_called(autojump_clock):
    registry = JobRegistry(tombstone_ttl_s=60)
    registry.cancel("j1", "alice", "early")
    chat = scripted([(1, "a")])
    bodies, record, _ = await run(chat, registry=registry)
    assert record.status == "cancelled" and record.answer == ""
    assert chat.calls == []
    assert kinds(bodies) == ["started", "done"] and bodies[-1].status == "cancelled"


async def test_tombstones_expire(autojump_clock):
    registry = JobRegistry(tombstone_ttl_s=60)
    registry.cancel("j1", "alice", "early")
    await trio.sleep(61)
    chat = scripted([(1, "a")])
    bodies, _, _ = await run(chat, registry=registry)
    assert len(chat.calls) == 1 and bodies[-1].status == "completed"


class SlowRetriever:
    """Retrieval that takes 30 s (virtual), as against a huge or distant collection."""

    def __init__(self) -> None:
        self.cancelled = False

    async def search(self, **kwargs):
        try:
            await trio.sleep(30)
        except trio.Cancelled:
            self.cancelled = True
            raise
        raise AssertionError("not reached")


async def test_a_cancel_during_retrieval_ends_the_job_before_any_model_call(autojump_clock):
    chat = scripted([(1, "a")])
    retriever = SlowRetriever()

    async def cancel_at_2s(registry):
        await trio.sleep(2)
        registry.cancel("j1", "alice", "stop")

    bodies, record, elapsed = await run(chat, during=cancel_at_2s, retriever=retriever,
                                        mode="rag")
    assert retriever.cancelled and chat.calls == []
    assert elapsed == pytest.approx(2, abs=0.1)
    assert kinds(bodies) == ["started", "done"] and bodies[-1].status == "cancelled"
    assert record.status == "cancelled"


async def test_retrieval_counts_against_the_job_deadline(autojump_clock):
    retriever = SlowRetriever()
    bodies, record, elapsed = await run(scripted([(1, "a")]), retriever=retriever,
                                        mode="rag", timeout_s=5)
    assert retriever.cancelled and elapsed == pytest.approx(5, abs=0.1)
    assert bodies[-1].status == "timeout" and record.status == "timeout"


class BrokenRetriever:
    async def search(self, **kwargs):
        raise RuntimeError("InvalidArgumentError: Expected where operator")  # as Chroma's


@pytest.mark.parametrize("broken", ["chat", "retriever"])
async def test_an_unexpected_exception_fails_only_its_job_as_internal(autojump_clock, broken):
    # A vendor library that fails in a way no adapter classified (a bug, a ValueError).
    chat = (ScriptedChat([Reply(tokens=("half ",), error=ValueError("Content-Length: 10, 10"))])
            if broken == "chat" else scripted([(1, "a")]))
    bodies, record, _ = await run(chat, retriever=BrokenRetriever(),
                                  mode="rag" if broken == "retriever" else "gen")
    assert kinds(bodies)[-2:] == ["error", "done"]
    assert bodies[-2].code == "internal" and not bodies[-2].retryable
    assert "Content-Length" not in bodies[-2].message  # the detail goes to the log only
    assert bodies[-1].status == "failed" and record.status == "failed"
    assert record.error.startswith("internal: internal error (")


class ClaimBug(FakeStore):
    async def claim(self, **_: object):
        raise RuntimeError("a bug in the claim")


async def test_a_claim_that_fails_unexpectedly_settles_its_job_as_failed(autojump_clock):
    # Left unsettled, the request would be redelivered and fail the same way forever.
    chat = scripted([(1, "a")])
    bodies, record, _ = await run(chat, store=ClaimBug())  # returns: the offset may settle
    assert chat.calls == []
    assert kinds(bodies) == ["error", "done"] and bodies[0].code == "internal"
    assert "a bug in the claim" not in bodies[0].message  # the detail goes to the log only
    assert bodies[-1].status == "failed"
    assert isinstance(record, JobRejected) and record.status == "failed"


async def test_a_bug_in_the_terminal_writes_settles_its_job_as_failed(autojump_clock,
                                                                      monkeypatch):
    def broken_record(*args, **kwargs):
        raise KeyError("a bug in building the terminal row")

    monkeypatch.setattr(finish_module, "terminal_record", broken_record)
    store = FakeStore()
    bodies, record, _ = await run(scripted([(1, "a"), (2, "b")]), store=store)
    assert kinds(bodies) == ["started", "token", "token", "error", "done"]
    assert bodies[-2].code == "internal" and bodies[-1].status == "failed"
    # The minimal row: failed, no content, what was billed kept; written under the
    # lease, so the job is not handed back to run again.
    assert record.status == "failed" and record.answer == "" and not record.messages
    assert record.prompt_tokens == 3 and record.completion_tokens == 2
    assert store.released == []


async def test_an_attempt_superseded_at_its_terminal_write_sends_no_done(autojump_clock):
    # Its lease ran out while it ran (a frozen worker): the later attempt ends the job.
    bodies, record, _ = await run(scripted([(1, "a")]), superseded=True)
    assert record.status == "completed" and record.attempt == 1
    assert "done" not in kinds(bodies) and "error" not in kinds(bodies)


async def test_an_attempt_that_loses_its_lease_stops_at_once(autojump_clock):
    # A later attempt took the job (this one's lease ran out while Postgres or this
    # worker was frozen): the renewal finds out, and the job stops calling the model
    # instead of answering to the end and sending a second `done`.
    chat = scripted([(t, "x ") for t in range(1, 50)])
    bodies, record, elapsed = await run(chat, store=FakeStore(taken={"j1"}), superseded=True)
    assert chat.cancelled and elapsed == pytest.approx(CONFIG.jobs.lease_s / 3, abs=0.5)
    assert record.attempt == 1 and "done" not in kinds(bodies)


async def test_a_job_whose_postgres_is_away_keeps_its_answer_until_it_lands(autojump_clock):
    # It used to give up after 30 s (FINISH_GRACE_S) and hand the job back, so the
    # redelivery paid the model again; a running worker now waits for the fenced write.
    chat = scripted([(1, "a")])
    bodies, record, elapsed = await run(chat, postgres_away_s=120)
    assert elapsed == pytest.approx(121, abs=1) and len(chat.calls) == 1
    assert kinds(bodies)[-2:] == ["final", "done"] and bodies[-1].status == "completed"
    assert record.status == "completed"
