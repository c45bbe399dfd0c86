"""Benchmarks: run with `bin/chat-actors bench NAME`. They report numbers; tests never assert timings.

Every benchmark takes `--quick` (the same steps, smaller: a smoke run, not numbers to
quote) and writes the numbers it prints as JSON to `--json FILE` (default
bench/results/NAME.json). tests/test_bench_quick.py runs each `--quick` and reads
that file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def result_options(parser: argparse.ArgumentParser, name: str, quick: str) -> None:
    """`--quick` (`quick` says what it shrinks) and `--json`, alike in every benchmark."""
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run, not numbers to quote: {quick}")
    parser.add_argument("--json", type=Path, default=RESULTS / f"{name}.json", metavar="FILE",
                        help=f"where to write the results (default bench/results/{name}.json)")


def write_result(path: Path, *, quick: bool, wall_s: float, **numbers: Any) -> None:
    """The run's numbers (`numbers`: what its table shows) as JSON at `path`, with when,
    on what machine, how long, and whether it was `--quick`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "machine": machine(), "quick": quick,
                                "wall_s": round(wall_s, 1), **numbers}, indent=2) + "\n")
    print(f"\nwritten to {path}")


def machine() -> dict[str, Any]:
    import psutil  # a bench dependency: the package itself may be imported without it

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30),
            "python": platform.python_version(), "system": platform.platform()}


def wait_ready(alive: Callable[[], None], url: str, deadline: float, what: str, log: Path,
               poll_s: float = 0.05) -> None:
    """Until `url` answers 200, `alive` raises (the process has exited), or `deadline`
    (time.perf_counter) passes: then `what` and the log's tail."""
    while True:
        alive()
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{what}:\n{log.read_text()[-3000:]}")
        time.sleep(poll_s)
