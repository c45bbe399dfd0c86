"""The suite's watchdog (tests/hang_watchdog.py): a hung test fails by itself and names where
it waits; one that no cancel reaches ends the run with status 3, never a silent hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HUNG = '''
import threading
import trio

async def test_waits_forever():
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep_forever)
        await trio.Event().wait()

async def test_after_it():
    await trio.sleep(0)

def test_stuck_in_a_thread():
    threading.Event().wait()
'''


def _pytest(tmp_path: Path, *select: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_hung.py").write_text(HUNG)
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CHAT_ACTORS_TEST_HANG_S": "1",
           "CHAT_ACTORS_TEST_KILL_AFTER_S": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.hang_watchdog", "-p", "no:cacheprovider",
         "-p", "no:langsmith", "-q", *[f"test_hung.py::{name}" for name in select]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_a_hung_trio_test_fails_naming_its_tasks_and_the_run_goes_on(tmp_path):
    done = _pytest(tmp_path, "test_waits_forever", "test_after_it")
    assert "=== watchdog: test_hung.py::test_waits_forever has run 1 s" in done.stderr
    # Every task's await stack, the sleeping child's included.
    assert "test_hung.py:8 in test_waits_forever" in done.stderr
    assert "in sleep_forever" in done.stderr
    assert "1 failed, 1 passed" in done.stdout, done.stdout
    assert done.returncode == 1


def test_a_test_stuck_where_no_cancel_reaches_ends_the_run_with_status_3(tmp_path):
    done = _pytest(tmp_path, "test_stuck_in_a_thread")
    assert "test_stuck_in_a_thread still runs 1 s after its cancel: the run ends here" \
        in done.stderr
    assert done.returncode == 3
