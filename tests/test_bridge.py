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
