"""The worker and the gateway as real processes, watched while the phases run.

A background thread samples both every SAMPLE_S: their RSS (the peak per phase), and
whether they still run. One that exited by itself is counted against the phase and
started again, as a supervisor would. One whose RSS passes RSS_CAP is SIGKILLed and
counted the same way: it is what the OOM killer would do a little later, and this
machine is shared, so the run must not wait for the kernel to pick a victim.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tools import local_stack

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_S = 0.2
RSS_CAP = 3 * 2**29  # 1.5 GiB
STOP_S = 15.0


@dataclass
class Managed:
    """`python -m tools.cli <argv>` as a process, its output appended to `log`."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    is_ready: Callable[[Managed], bool]
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"---- start {self.starts + 1}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tools.cli", *self.argv], cwd=ROOT, stdout=out,
                stderr=out, env={**os.environ, "PYTHONPATH": str(ROOT), **self.env})
        self.starts += 1

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.is_ready(self):
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited while starting: "
                                   f"{local_stack.last_words(self.log, lines=4)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout_s:.0f} s: "
                                   f"{local_stack.last_words(self.log, lines=4)}")
            time.sleep(0.1)

    def rss(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        try:
            return psutil.Process(self.process.pid).memory_info().rss
        except psutil.NoSuchProcess:
            return None

    def stop(self) -> int | None:
        if self.process is None:
            return None
        return local_stack.terminate(self.process, signal.SIGTERM, STOP_S)


def worker_ready(worker: Managed) -> bool:
    """It said `ready:` as often as it was started (the log is appended to)."""
    return worker.log.exists() and worker.log.read_bytes().count(b" ready: ") >= worker.starts


def gateway_ready(port: int) -> Callable[[Managed], bool]:
    def ready(_: Managed) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False
    return ready


@dataclass
class PhaseWatch:
    peak_rss: dict[str, int] = field(default_factory=dict[str, int])
    exits: dict[str, int] = field(default_factory=dict[str, int])
    capped: dict[str, int] = field(default_factory=dict[str, int])  # of the exits
    last_words: list[str] = field(default_factory=list[str])


@dataclass
class Watch:
    processes: list[Managed]
    phase: str = "start"
    phases: dict[str, PhaseWatch] = field(default_factory=dict[str, PhaseWatch])
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def current(self) -> PhaseWatch:
        return self.phases.setdefault(self.phase, PhaseWatch())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for process in self.processes:
                self.sample(process)

    def sample(self, managed: Managed) -> None:
        watch = self.current()
        process = managed.process
        if process is None:
            return
        rss = managed.rss()
        if rss is not None:
            watch.peak_rss[managed.name] = max(watch.peak_rss.get(managed.name, 0), rss)
            if rss <= RSS_CAP:
                return
            process.kill()
            process.wait()
            watch.capped[managed.name] = watch.capped.get(managed.name, 0) + 1
            why = f"SIGKILLed at {rss / 2**20:,.0f} MB RSS (the cap)"
        elif process.poll() is not None:
            why = f"exit {process.returncode}: {local_stack.last_words(managed.log, lines=2)}"
        else:
            return
        watch.exits[managed.name] = watch.exits.get(managed.name, 0) + 1
        watch.last_words.append(f"{managed.name}: {why}")
        managed.start()
