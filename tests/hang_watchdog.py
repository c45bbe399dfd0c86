"""A test that hangs fails by itself, naming where it waits, instead of holding the
whole run until CI's hard limit.

Each test (setup, call and teardown) gets `CHAT_ACTORS_TEST_HANG_S` seconds (600 by
default: ten times the slowest test). Past that, every thread's stack and every Trio
task's await stack go to stderr, and the test's Trio run is cancelled, so the test
fails and the run goes on. A test still not done `KILL_AFTER_S` later (stuck in a
thread no cancel reaches) ends the whole process with status 3: a red run that says
why, not a silent timeout."""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

HANG_S = float(os.environ.get("CHAT_ACTORS_TEST_HANG_S", "600"))
KILL_AFTER_S = float(os.environ.get("CHAT_ACTORS_TEST_KILL_AFTER_S", "120"))

_runs: dict[str, trio.lowlevel.TrioToken] = {}  # the Trio run of the test now running


class _Watch(trio.abc.Instrument):
    """Notes the token of the test's Trio run, so the watchdog's thread can reach it."""

    def before_run(self) -> None:
        _runs["current"] = trio.lowlevel.current_trio_token()

    def after_run(self) -> None:
        _runs.pop("current", None)


def _watched(run: Callable[..., Any]) -> Callable[..., Any]:
    def watched_run(fn: Callable[..., Any], *, clock: Any = None,
                    instruments: Any = ()) -> Any:
        return run(fn, clock=clock, instruments=[*instruments, _Watch()])
    return watched_run


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """pytest-trio marks each async test with the function that runs it; ours wraps
    that function and adds the instrument."""
    for item in items:
        marker = item.get_closest_marker("trio")
        if marker is not None:
            item.add_marker(pytest.mark.trio(run=_watched(marker.kwargs.get("run", trio.run))),
                            append=False)


_stderr: list[Any] = [sys.__stderr__]  # the terminal's, not a test's captured one


def pytest_configure() -> None:
    # Capture is off between tests, so fd 2 is the run's own stderr here; a test's
    # capture (and os._exit) would swallow what is written to it later.
    _stderr[0] = os.fdopen(os.dup(2), "w", closefd=True)


def pytest_unconfigure() -> None:
    _stderr[0].close()
    _stderr[0] = sys.__stderr__


def _say(text: str) -> None:
    _stderr[0].write(text + "\n")
    _stderr[0].flush()


def _task_stacks() -> None:
    """Runs inside the hung Trio run: print each task's await stack, then cancel it all."""
    root = trio.lowlevel.current_root_task()
    if root is None:
        return
    todo = [(root, 0)]
    while todo:
        task, depth = todo.pop()
        _say(f"{'  ' * depth}task {task.name!r}")
        for frame, lineno in task.iter_await_frames():
            _say(f"{'  ' * depth}  {frame.f_code.co_filename}:{lineno} in {frame.f_code.co_name}")
        todo += [(child, depth + 1) for nursery in task.child_nurseries
                 for child in nursery.child_tasks]
    _asyncio_stacks()
    # The tasks just under the root are the test's main task and Trio's own; cancelling
    # what each has opened ends the test, while the task that runs this (and every
    # thread's way back in) keeps running.
    for nursery in root.child_nurseries:
        for task in nursery.child_tasks:
            for opened in task.child_nurseries:
                opened.cancel_scope.cancel()


def _asyncio_stacks() -> None:
    """Every asyncio task not done (trio-asyncio's loop runs LiteLLM), with its stack."""
    for task in [o for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()]:
        _say(f"asyncio task {task.get_name()!r} ({task.get_coro()!r})")
        for frame in task.get_stack(limit=40):
            _say(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")


def _hung(nodeid: str, done: threading.Event) -> None:
    _say(f"\n=== watchdog: {nodeid} has run {HANG_S:g} s; its stacks follow, then it is cancelled")
    faulthandler.dump_traceback(file=_stderr[0], all_threads=True)
    token = _runs.get("current")
    if token is not None:
        try:
            token.run_sync_soon(_task_stacks)
        except trio.RunFinishedError:
            pass
    if not done.wait(KILL_AFTER_S):
        _say(f"=== watchdog: {nodeid} still runs {KILL_AFTER_S:g} s after its cancel: "
             "the run ends here")
        faulthandler.dump_traceback(file=_stderr[0], all_threads=True)
        os._exit(3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    done = threading.Event()
    timer = threading.Timer(HANG_S, _hung, args=(item.nodeid, done))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        done.set()
        timer.cancel()
