"""The property-based fuzzers at length: the request and control decoders with
hostile shapes (tests/test_fuzz_input.py) and the HTTP/1.1 parser against h11
(tests/test_http1_differential.py). The test command runs them with a few hundred
to two thousand examples each; this runs `--examples` each and reports the time.

    bin/chat-actors bench fuzz [--examples 20000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["tests/test_http1_differential.py", "tests/test_fuzz_input.py"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-actors bench fuzz",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20_000, help="examples per property")
    args = parser.parse_args(argv)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TARGETS,
         "-k", "not mixed_burst", "--hypothesis-show-statistics"],
        cwd=ROOT, env={**os.environ, "CHAT_ACTORS_FUZZ_EXAMPLES": str(args.examples)})
    print(f"\nfuzz: {args.examples} examples per property, {time.monotonic() - started:.0f} s, "
          f"{'no failure' if done.returncode == 0 else 'FAILURES (see above)'}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
