"""The property-based fuzzers at length: the request and control decoders with
hostile shapes (tests/test_fuzz_input.py) and the HTTP/1.1 parser against h11
(tests/test_http1_differential.py). The test command runs them with a few hundred
to two thousand examples each; this runs `--examples` each and reports the time
and each property's outcome, and writes them as JSON (`--json`, default
bench/results/fuzz.json).

    bin/chat-actors bench fuzz [--examples 20000] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from bench import result_options, write_result

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["tests/test_http1_differential.py", "tests/test_fuzz_input.py"]
QUICK_EXAMPLES = 100


def outcomes(junit_xml: Path) -> list[dict[str, object]]:
    """Each property pytest ran: its name, outcome and seconds (from its JUnit report)."""
    rows: list[dict[str, object]] = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = next((kind for kind in ("failure", "error", "skipped") if kind in kinds),
                       "passed")
        rows.append({"name": f"{case.get('classname')}::{case.get('name')}",
                     "outcome": outcome, "seconds": float(case.get("time") or 0)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-actors bench fuzz",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, help="examples per property (default 20000)")
    result_options(parser, "fuzz", f"{QUICK_EXAMPLES} examples per property (seconds)")
    args = parser.parse_args(argv)
    examples = args.examples if args.examples is not None else \
        QUICK_EXAMPLES if args.quick else 20_000
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chat-actors-fuzz-") as folder:
        report = Path(folder) / "junit.xml"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TARGETS,
             "-k", "not mixed_burst", "--hypothesis-show-statistics",
             f"--junitxml={report}"],
            cwd=ROOT, env={**os.environ, "CHAT_ACTORS_FUZZ_EXAMPLES": str(examples)})
        properties = outcomes(report) if report.exists() else []
    elapsed = time.monotonic() - started
    print(f"\nfuzz: {examples} examples per property, {len(properties)} properties, "
          f"{elapsed:.0f} s, {'no failure' if done.returncode == 0 else 'FAILURES (see above)'}")
    write_result(args.json, quick=args.quick, wall_s=elapsed, examples=examples,
                 passed=done.returncode == 0, properties=properties)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
