"""The hostile-client run's figures per phase, the issue's bars, and the printout."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from bench import machine

P99_FACTOR = 2.0
RSS_FACTOR = 1.5


@dataclass
class Phase:
    name: str
    turns: int  # honest logical requests begun
    done: int  # ... that got their `done`
    events: int  # entries in their jobs' streams
    missed: int  # ... never received by their user
    unfinished: int  # honest turns without a `done` in time
    statuses: dict[str, int]  # the honest turns' `done` status ("None": no done in time)
    answered: int  # honest turns the vendor answered (each turn's marker in its call)
    caught_up: int  # entries written before their response opened: not timed
    p50_ms: float | None
    p99_ms: float | None
    p90_ms: float | None
    max_ms: float | None
    post_p99_ms: float | None  # honest POSTs that were accepted
    calm_post_p99_ms: float | None  # ... apart from the broker's pause
    uploads: int
    uploads_ok: int
    upload_max_s: float | None
    gateway_rss: int
    worker_rss: int
    run_twice: int  # logical requests (honest and hostile) run more than once
    twice_detail: dict[str, dict[str, int]]
    worker_exits: int
    gateway_exits: int
    capped: int  # of the exits: SIGKILLed at the RSS cap
    exit_lines: list[str]
    lost_examples: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])
    hostile: dict[str, Any] = field(default_factory=dict[str, Any])
    cut: bool = False  # a client process was stopped at its bound
    load_1m: float = 0.0  # the machine's 1-minute load average as the phase ended


@dataclass(frozen=True)
class Check:
    bar: str
    value: str
    passed: bool
    measured: bool = False  # a bar on latency or memory, not judged in a --quick run


def bars(a: Phase, b: Phase) -> list[Check]:
    """Issue 35's bars: B against A, and the zero bars over both phases."""
    def mb(n: int) -> str:
        return f"{n / 2**20:,.0f} MB"

    lost = a.missed + b.missed + a.unfinished + b.unfinished
    checks = [Check("0 honest events missed", f"A {a.missed} + {a.unfinished} turns without "
                    f"done; B {b.missed} + {b.unfinished}", lost == 0)]
    if a.p99_ms is None or b.p99_ms is None:
        checks.append(Check("p99 within 2x of honest-only", "no latencies", False))
    else:
        checks.append(Check("p99 within 2x of honest-only",
                            f"B {b.p99_ms:,.1f} ms, limit {P99_FACTOR * a.p99_ms:,.1f} ms",
                            b.p99_ms <= P99_FACTOR * a.p99_ms, measured=True))
    for name, peak_a, peak_b in (("gateway", a.gateway_rss, b.gateway_rss),
                                 ("worker", a.worker_rss, b.worker_rss)):
        checks.append(Check(f"{name} peak RSS within 1.5x", f"B {mb(peak_b)}, limit "
                            f"{mb(int(RSS_FACTOR * peak_a))}",
                            0 < peak_b <= RSS_FACTOR * peak_a, measured=True))
    checks.append(Check("0 run twice", f"A {a.run_twice}, B {b.run_twice}",
                        a.run_twice + b.run_twice == 0))
    exits = a.worker_exits + b.worker_exits + a.gateway_exits + b.gateway_exits
    checks.append(Check("0 exits", f"worker A {a.worker_exits} B {b.worker_exits}; gateway "
                        f"A {a.gateway_exits} B {b.gateway_exits}", exits == 0))
    return checks


def _cell(value: float | int | str | None, fmt: str = ",.0f") -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:{fmt}}"


def table(a: Phase, b: Phase) -> str:
    rows: list[tuple[str, str, str]] = [
        ("honest turns done / begun", f"{a.done:,}/{a.turns:,}", f"{b.done:,}/{b.turns:,}"),
        ("  (the vendor answered)", _cell(a.answered), _cell(b.answered)),
        ("honest events missed", _cell(a.missed), _cell(b.missed)),
        ("  (of the events in their streams)", _cell(a.events), _cell(b.events)),
        ("XADD -> client p50 ms", _cell(a.p50_ms, ",.1f"), _cell(b.p50_ms, ",.1f")),
        ("XADD -> client p99 ms", _cell(a.p99_ms, ",.1f"), _cell(b.p99_ms, ",.1f")),
        ("  (written before their GET: untimed)", _cell(a.caught_up),
         _cell(b.caught_up)),
        ("gateway peak RSS MB", _cell(a.gateway_rss / 2**20), _cell(b.gateway_rss / 2**20)),
        ("worker peak RSS MB", _cell(a.worker_rss / 2**20), _cell(b.worker_rss / 2**20)),
        ("jobs run twice", _cell(a.run_twice), _cell(b.run_twice)),
        ("worker exits", _cell(a.worker_exits), _cell(b.worker_exits)),
        ("gateway exits", _cell(a.gateway_exits), _cell(b.gateway_exits)),
        ("  (of the exits: killed at the RSS cap)", _cell(a.capped), _cell(b.capped)),
        ("honest POST p99 ms (accepted)", _cell(a.post_p99_ms), _cell(b.post_p99_ms)),
        ("  (apart from the broker's pause)", _cell(a.calm_post_p99_ms),
         _cell(b.calm_post_p99_ms)),
        ("honest uploads answered 2xx", f"{a.uploads_ok}/{a.uploads}",
         f"{b.uploads_ok}/{b.uploads}"),
        ("honest upload slowest s", _cell(a.upload_max_s, ",.1f"),
         _cell(b.upload_max_s, ",.1f")),
        ("machine load, 1 min avg at the end", _cell(a.load_1m, ".1f"), _cell(b.load_1m, ".1f")),
    ]
    lines = [f"{'':40} {'A: honest only':>16} {'B: + hostile':>14}"]
    lines += [f"{label:40} {left:>16} {right:>14}" for label, left, right in rows]
    return "\n".join(lines)


def hostile_lines(b: Phase) -> list[str]:
    lines: list[str] = []
    for kind, seen in b.hostile.items():
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(seen["status"].items()))
        notes = "; ".join(f"{k} {v}" for k, v in seen.items() if k not in ("sent", "status"))
        lines.append(f"  {kind:26} sent {seen['sent']:>4}  answers {{{statuses}}}"
                     + (f"  {notes}" if notes else ""))
    return lines


def print_report(a: Phase, b: Phase, checks: list[Check], elapsed_s: float, quick: bool,
                 rss_cap: int) -> None:
    print(f"\nhostile-client run{' (--quick)' if quick else ''}: {elapsed_s / 60:.1f} min; "
          f"{machine()['cpu']}, {os.cpu_count()} cores\n")
    print(table(a, b))
    print("\nissue 35's bars")
    for check in checks:
        verdict = "PASS" if check.passed else "FAIL"
        if quick and check.measured:
            verdict += " (not judged in --quick)"
        print(f"  {check.bar:32} {check.value:58} {verdict}")
    for phase in (a, b):
        print(f"  phase {phase.name}: honest turns by `done` status: " + ", ".join(
            f"{status} {n}" for status, n in sorted(phase.statuses.items())))
    print("\nhostile users in phase B (answers by status; 0: none within the bound)")
    print("\n".join(hostile_lines(b)) or "  none")
    for phase in (a, b):
        for line in phase.exit_lines:
            print(f"  phase {phase.name} exit: {line}")
        for example in phase.lost_examples[:3]:
            print(f"  phase {phase.name} turn short of its stream: {example}")
        for found, seen in list(phase.twice_detail.items())[:5]:
            print(f"  phase {phase.name} ran twice: {found}: vendor answers {seen['answers']}, "
                  f"jobs {seen['jobs']}")
        if phase.cut:
            print(f"  phase {phase.name}: a client process was stopped at its time bound")
    print(f"  (a process over {rss_cap / 2**20:,.0f} MB RSS is SIGKILLed and counted as an "
          "exit, as the OOM killer would)")
