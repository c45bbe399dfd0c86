"""The trio-asyncio bridge: one asyncio loop, open for the whole run, on top of Trio."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_asyncio

log = logging.getLogger("chat_actors.aio")


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


RECANCEL_S = 1.0  # an asyncio task that outlived its cancel is cancelled again this often


async def run_asyncio(coro_fn: Callable[..., Any], *args: Any) -> Any:
    """Await an asyncio coroutine function from Trio: one bridge crossing, its result
    or its exception. Cancelled from Trio, the asyncio task is cancelled, and again
    every RECANCEL_S until it has ended. trio-asyncio cancels it once and waits for
    it; a library that lets one CancelledError pass (asyncio.wait_for on Python 3.11
    does, when its inner task finished at the same moment) or awaits again while
    cleaning up held the caller, and with it a job and the worker's shutdown, until
    its own timeout (LiteLLM's: 600 s), seen in CI."""
    loop: asyncio.AbstractEventLoop | None = trio_asyncio.current_loop.get()
    if loop is None:
        raise RuntimeError("run_asyncio runs inside open_bridge")

    async def called() -> Any:  # the coroutine is made inside its task (its context)
        return await coro_fn(*args)

    return await _awaited(asyncio.ensure_future(called(), loop=loop), loop)


async def _awaited(future: asyncio.Task[Any], loop: asyncio.AbstractEventLoop) -> Any:
    """`future`'s outcome, from Trio; a Trio cancel keeps cancelling it until it ends."""
    waiter = trio.lowlevel.current_task()
    raise_cancel: Callable[[], Any] | None = None

    cancels = 0

    def cancel_again() -> None:
        nonlocal cancels
        if future.done():
            return
        if cancels:
            where = [f"{f.f_code.co_filename}:{f.f_lineno}" for f in future.get_stack(limit=3)]
            log.warning("an asyncio task outlived its cancel (%d so far), cancelled again; "
                        "it waits at %s", cancels, " < ".join(where) or "?")
        cancels += 1
        future.cancel()
        loop.call_later(RECANCEL_S, cancel_again)

    def ended(_: asyncio.Future[Any]) -> None:
        trio.lowlevel.reschedule(waiter)

    def abort(raise_cancel_now: Callable[[], Any]) -> trio.lowlevel.Abort:
        nonlocal raise_cancel
        raise_cancel = raise_cancel_now
        cancel_again()
        return trio.lowlevel.Abort.FAILED  # woken by `ended`, however it ends

    future.add_done_callback(ended)
    await trio.lowlevel.wait_task_rescheduled(abort)
    try:
        return future.result()
    except asyncio.CancelledError:
        if raise_cancel is None:
            raise  # cancelled on the asyncio side, not by us: as it is
        raise_cancel()  # our cancel: trio.Cancelled
        raise


async def to_trio(async_fn: Callable[..., Any], *args: Any) -> Any:
    """From asyncio code, await a Trio function (one bridge crossing)."""
    return await trio_asyncio.trio_as_aio(async_fn)(*args)
