"""The trio-asyncio bridge: one asyncio loop, open for the whole run, on top of Trio."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_asyncio


class BoxingExecutor(trio_asyncio.TrioExecutor):
    """Runs executor jobs in Trio threads, boxing their return value.

    LiteLLM hands `loop.run_in_executor` a function that returns a coroutine.
    TrioExecutor runs it with `trio.to_thread.run_sync`, which refuses any
    function returning a coroutine ("Trio expected a sync function"). Boxing
    the result in a tuple hides the coroutine from Trio; unboxing hands the
    caller exactly what the function returned.
    """

    async def submit(self, func: Callable[..., Any], *args: Any) -> Any:
        box = await trio.to_thread.run_sync(lambda: (func(*args),), limiter=self._limiter)
        return box[0]


CLOSE_TIMEOUT_S = 5.0


@asynccontextmanager
async def open_bridge(max_executor_threads: int = 8,
                      closing: Sequence[Callable[[], Awaitable[None]]] = ()
                      ) -> AsyncIterator[None]:
    """Open the asyncio loop that asyncio-only libraries (LiteLLM) run on. Each of
    `closing` (asyncio coroutine functions) runs on it before it closes, even when
    the run was cancelled, within CLOSE_TIMEOUT_S: what a library keeps open belongs
    to this loop and must not outlive it."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_default_executor(BoxingExecutor(max_workers=max_executor_threads))
        try:
            yield
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLOSE_TIMEOUT_S
                for close in closing:
                    await run_asyncio(close)


def run_asyncio(coro_fn: Callable[..., Any], *args: Any) -> Any:
    """Await an asyncio coroutine function from Trio: one bridge crossing."""
    return trio_asyncio.aio_as_trio(coro_fn)(*args)


async def to_trio(async_fn: Callable[..., Any], *args: Any) -> Any:
    """From asyncio code, await a Trio function (one bridge crossing)."""
    return await trio_asyncio.trio_as_aio(async_fn)(*args)
