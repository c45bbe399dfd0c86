"""A client process of the hostile-client run: `python -m bench.hostile.clients ROLE`
(ROLE: honest or hostile), apart from the harness so that neither side's work slows
the other's reading.

It reads its Plan as one JSON line on stdin, says `{"ready": true}`, waits for `go`
(so both processes of a phase start together), runs until the plan's end plus the
longest wait it allows, and prints its tally as one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

import trio

from bench.hostile.attacks import HostileTally, run_hostile
from bench.hostile.honest import HonestTally, run_honest
from bench.hostile.plan import Context, Plan


def grace_s(plan: Plan) -> float:
    """How long after the plan's end a user may still wait for something it began."""
    return max(plan.turn_timeout_s + plan.post_timeout_s + plan.pause_s, plan.schema_wait_s,
               plan.pdf_wait_s, plan.oversize_cap_s, plan.burst_hold_s) + 10


async def serve(role: str, plan: Plan) -> dict[str, Any]:
    """The role's tally; `cut` says the run was stopped at its bound (what it holds
    then is still reported)."""
    ctx = Context(plan)
    tally = HonestTally() if role == "honest" else HostileTally()
    with trio.move_on_after(plan.seconds + grace_s(plan)) as bound:
        if isinstance(tally, HonestTally):
            await run_honest(ctx, tally)
        else:
            await run_hostile(ctx, tally)
    return tally.as_json() | {"cut": bound.cancelled_caught}


def main() -> int:
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role not in ("honest", "hostile"):
        print("usage: python -m bench.hostile.clients honest|hostile", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # bursts hold hundreds open
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, hard), hard))
    if role == "hostile":
        # An attacker's own CPU would be on another machine: here it shares two cores
        # with the gateway, so it yields them first. What it costs the gateway and the
        # worker is still all theirs.
        os.nice(10)
    plan = Plan.from_json(json.loads(sys.stdin.readline()))
    print(json.dumps({"ready": True}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    print(json.dumps(trio.run(serve, role, plan)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
