"""LiteLLM's real client under trio-asyncio (its run_in_executor trap, see actors/adapters/aio.py)."""

from __future__ import annotations

import trio

from actors.adapters import aio
from actors.adapters.llm.chat import LiteLLMChat, close_clients, litellm
from actors.errors import PermanentError, TransientError
from messages.mailboxes import StreamFinished, TokenDelta
from tests.scripted_llm import Reply


async def collect(chat, llm, **kwargs):
    send, receive = trio.open_memory_channel(100)
    async with receive:
        await chat.stream(model="openai/scripted", api_base=llm.url, api_key_env="K",
                          messages=[{"role": "user", "content": "hi"}], params={}, out=send,
                          **kwargs)
        return [item async for item in receive]


async def test_streaming_and_non_streaming_calls_work_inside_the_bridge(llm):
    llm.default = Reply(tokens=("a", "b", "c"))
    async with aio.open_bridge(closing=[close_clients]):
        items = await collect(LiteLLMChat(), llm)
        assert [i.text for i in items if isinstance(i, TokenDelta)] == ["a", "b", "c"]
        assert items[-1] == StreamFinished(finish_reason="stop", prompt_tokens=1,
                                           completion_tokens=3, model="scripted")

        async def complete():
            return await litellm.acompletion(
                model="openai/scripted", api_base=llm.url, api_key="k",
                messages=[{"role": "user", "content": "hi"}])

        response = await aio.run_asyncio(complete)
        assert response.choices[0].message.content == "abc"


async def test_vendor_failures_are_classified(llm):
    async with aio.open_bridge(closing=[close_clients]):
        llm.queue(Reply(status=429, headers=(("retry-after", "7"),)))
        try:
            await collect(LiteLLMChat(), llm)
        except TransientError as exc:
            assert exc.retry_after == 7
        else:
            raise AssertionError("a 429 must be transient")
        llm.queue(Reply(status=401, error_body='{"error": {"message": "bad key"}}'))
        try:
            await collect(LiteLLMChat(), llm)
        except PermanentError as exc:
            assert exc.code == "auth"
        else:
            raise AssertionError("a 401 must be permanent")


async def test_cancelling_the_stream_closes_the_vendor_connection(llm):
    llm.default = Reply(tokens=tuple("abcdefghij"), token_delay_s=0.2)
    async with aio.open_bridge(closing=[close_clients]):
        with trio.move_on_after(0.5):
            await collect(LiteLLMChat(), llm)
        await trio.to_thread.run_sync(
            lambda: llm.wait_until(lambda calls: calls and calls[0].disconnected, 10))
    assert llm.calls[0].tokens_sent < 10


async def test_a_cancel_reaches_an_asyncio_task_that_let_the_first_one_pass(autojump_clock):
    """trio-asyncio cancels an asyncio task once and waits for it. A library that lets
    that CancelledError pass (asyncio.wait_for on Python 3.11 can) or awaits again in
    its cleanup held the job until its own timeout (seen in CI: 600 s): the bridge
    cancels it again until it ends."""
    import asyncio

    seen: list[str] = []

    async def swallows_one() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("first cancel let pass")
        try:
            await asyncio.sleep(3600)
        finally:
            seen.append("second cancel ended it")

    async def cleans_up_slowly() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(3600)  # a close that never ends

    async with aio.open_bridge():
        for coro_fn in (swallows_one, cleans_up_slowly):
            began = trio.current_time()  # the autojump clock's: asyncio's timers use it
            with trio.move_on_after(1) as scope:
                await aio.run_asyncio(coro_fn)
            assert scope.cancelled_caught
            # Ended by the next cancel, not by its hour-long sleep.
            assert trio.current_time() - began <= 1 + 2 * aio.RECANCEL_S, coro_fn.__name__
    assert seen == ["first cancel let pass", "second cancel ended it"]

    async def answers() -> int:
        return 42

    async def fails() -> None:
        raise ValueError("from asyncio")

    async with aio.open_bridge():
        assert await aio.run_asyncio(answers) == 42
        try:
            await aio.run_asyncio(fails)
        except ValueError as exc:
            assert str(exc) == "from asyncio"
        else:
            raise AssertionError("the asyncio side's exception was not raised")
