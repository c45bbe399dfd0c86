"""What every run must leave behind, however many workers ran it and whatever failed:
read from the real Redis, Postgres and broker after the run (contract 6.1, 4.2, 4.11).

Shared by the many-workers test and `bench chaos`. The vendor's answers must name
their call (`NumberedLLM`) so an answer in the history can be traced to the attempt
that streamed it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

import confluent_kafka
import psycopg
import redis

from config import job_keys
from tests.scripted_llm import Call, Reply, ScriptedLLM, refusal, text_of
from tools.chat_client import Assembled

TERMINAL = ("completed", "cancelled", "timeout", "failed", "rejected")


class NumberedLLM(ScriptedLLM):
    """Every answer starts with its own call number, so two attempts of a job never
    stream the same text. Subclasses choose the replies (`choose`)."""

    def __init__(self) -> None:
        super().__init__()
        self._numbers = itertools.count(1)

    def choose(self) -> Reply:
        return super()._next_reply([])

    def _next_reply(self, messages: list[dict[str, Any]]) -> Reply:
        reply = self.choose()
        if reply.raw is not None or reply.status != 200:
            return reply
        # A request that continues an answer (it ends with that answer's start) gets the
        # rest of the same numbered answer, as a vendor continuing it would.
        last = messages[-1] if messages else {}
        begun = re.match(r"#(\d+)( |$)", text_of(last.get("content"))) \
            if last.get("role") == "assistant" else None
        number = begun.group(1) if begun else next(self._numbers)
        return dataclasses.replace(reply, tokens=(f"#{number} ", *reply.tokens), continues=True)


def job_of(call: Call) -> str:
    """The job a call answers: requests end their message with the job id (the last
    user message: a continuation ends with the answer's start)."""
    asked = [m for m in call.messages if m.get("role") == "user"]
    words = text_of(asked[-1].get("content")).split() if asked else []
    return words[-1] if words else ""


@dataclass
class Verdict:
    jobs: int
    one_done: int = 0  # jobs with exactly one `done`
    lost: int = 0  # jobs with no `done`
    gaps: int = 0  # attempts whose seq is not 0, 1, 2, ... (a gap or a duplicate)
    stale: int = 0  # jobs with an event of attempt N after attempt N+k's `started`
    not_terminal: int = 0  # jobs whose row is missing, queued or running
    done_vs_row: int = 0  # jobs whose `done` disagrees with the row (status, attempt)
    wrong_answer: int = 0  # completed jobs whose history answer is not the one streamed
    after_done: int = 0  # model calls begun after their job's `done` was written
    answered_twice: int = 0  # jobs the vendor answered in full more than once (lost leases)
    assembled_wrong: int = 0  # completed jobs a client following contract 3.3 gets wrong
    # Later attempts (a takeover, or a restart inside a worker) that continued the
    # earlier attempt's answer, and those that started over, by reason.
    resumed: int = 0
    restarted: dict[str, int] = field(default_factory=dict)
    tokens_saved: int = 0  # vendor tokens the resumed takeovers did not pay again
    # Continuation on every vendor (contract 3.3, "One decision"):
    continuation_failed: int = 0  # jobs failed by a refused prefill or a continuation bug
    prefills: int = 0  # model calls that continued an answer (ended in an assistant turn)
    prefills_refused: int = 0  # of those, refused by the vendor (a 400 naming the turn)
    # Answer tokens the vendor streamed twice: a new answer begun within one attempt
    # after the client was shown an earlier one (a bug), and those of the attempts a
    # restart discarded, by reason (the price of starting over).
    paid_twice: int = 0
    paid_again: dict[str, int] = field(default_factory=dict)
    # Prompt tokens (the vendor's count: words) sent again after a job's first call, by
    # why: a continuation (the prefill's call), or a fresh call (a retry of nothing
    # shown, a restart, a fallback).
    prompt_again: dict[str, int] = field(default_factory=dict)
    uncommitted: int = 0  # partitions whose committed offset is short of their end
    statuses: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # the first few problems, named

    def problems(self) -> int:
        return (self.jobs - self.one_done + self.gaps + self.stale + self.not_terminal
                + self.done_vs_row + self.wrong_answer + self.after_done + self.uncommitted
                + self.assembled_wrong + self.continuation_failed + self.paid_twice)

    def note(self, job_id: str, what: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(f"{job_id}: {what}")

    def report(self) -> str:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        lines = [
            f"jobs submitted:                               {self.jobs}",
            f"jobs with exactly one done:                   {self.one_done}",
            f"jobs lost (no done):                          {self.lost}",
            f"jobs not terminal in Postgres:                {self.not_terminal}",
            f"final statuses:                               {statuses}",
            f"done disagreeing with the terminal row:       {self.done_vs_row}",
            f"events of an attempt after a later started:   {self.stale}",
            f"completed jobs whose history is not the answer: {self.wrong_answer}",
            f"gaps or duplicates in event sequences:        {self.gaps}",
            f"model calls for already-finished jobs:        {self.after_done}",
            f"jobs answered twice by the vendor (legit):    {self.answered_twice}",
            f"answers a client assembles wrong (3.3):       {self.assembled_wrong}",
            f"later attempts resumed / restarted:           {self.resumed} / "
            f"{sum(self.restarted.values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.restarted.items())) or '-'})",
            f"vendor tokens the resumed takeovers saved:    {self.tokens_saved}",
            f"jobs failed because of continuation (goal 0): {self.continuation_failed}",
            f"continuations sent / refused by the vendor:   {self.prefills} / "
            f"{self.prefills_refused}",
            f"completion tokens paid twice (goal 0):        {self.paid_twice}",
            f"completion tokens paid again by restarts:     {sum(self.paid_again.values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.paid_again.items())) or '-'})",
            f"prompt tokens paid again:                     {sum(self.prompt_again.values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.prompt_again.items())) or '-'})",
            f"partitions whose committed offset is short:   {self.uncommitted}",
            *(f"  e.g. {example}" for example in self.examples)]
        return "\n".join(lines)


def verify(jobs: list[str], rds: redis.Redis, pg_url: str, llm: ScriptedLLM, *,
           template: str = "sse:chat:{job_id}") -> Verdict:
    """Read every job's stream and rows; `rds` must decode responses."""
    verdict = Verdict(jobs=len(jobs))
    with psycopg.connect(pg_url) as conn:
        rows = {r[0]: r[1:] for r in conn.execute(
            "SELECT job_id, status, attempt FROM llm_jobs WHERE job_id = ANY(%s)", (jobs,))}
        for job_id, error in conn.execute(
                "SELECT job_id, error FROM llm_jobs WHERE job_id = ANY(%s) AND status = 'failed'",
                (jobs,)).fetchall():
            if (error or "").startswith(("prefill_refused", "internal")):
                verdict.continuation_failed += 1
                verdict.note(job_id, f"failed: {error}")
        answers = dict(conn.execute(
            "SELECT job_id, content FROM llm_messages WHERE job_id = ANY(%s) AND role = 'assistant'",
            (jobs,)).fetchall())
    done_at: dict[str, float] = {}
    for job_id in jobs:
        entries = [f for _, f in rds.xrange(job_keys(template, job_id, cluster=False).stream)
                   if f.get("jobId") == job_id]
        _check_stream(verdict, job_id, entries)
        _count_takeovers(verdict, entries)
        _count_paid(verdict, job_id, entries)
        dones = [f for f in entries if f["event"] == "done"]
        status, attempt = rows.get(job_id, ("missing", 0))
        verdict.statuses[status] = verdict.statuses.get(status, 0) + 1
        if status not in TERMINAL:
            verdict.not_terminal += 1
            verdict.note(job_id, f"row {status}")
        if not dones:
            continue
        done = dones[-1]
        done_at[job_id] = int(done["ts"]) / 1000
        if (json.loads(done["data"])["status"], int(done["attempt"])) != (status, attempt):
            verdict.done_vs_row += 1
            verdict.note(job_id, f"done {done['data']} of attempt {done['attempt']}, "
                                 f"row {status} of attempt {attempt}")
        finals = [f for f in entries if f["event"] == "final" and f["attempt"] == done["attempt"]]
        client = Assembled()
        for f in entries:
            client.add(f["event"], int(f["attempt"]), json.loads(f["data"]))
        if status == "completed" and finals and client.text != json.loads(
                finals[-1]["data"])["text"]:
            verdict.assembled_wrong += 1
            verdict.note(job_id, f"a client assembles {client.text!r}")
        if status == "completed" and (
                not finals or answers.get(job_id) != json.loads(finals[-1]["data"])["text"]):
            verdict.wrong_answer += 1
            verdict.note(job_id, f"history {answers.get(job_id)!r}, "
                                 f"streamed {[json.loads(f['data'])['text'] for f in finals]}")
    full_answers: dict[str, int] = {}
    first_call: set[str] = set()
    for call in llm.calls:
        job_id = job_of(call)
        prompt = sum(len(text_of(m.get("content")).split()) for m in call.messages
                     if m.get("role") != "assistant" or m is not call.messages[-1])
        continued = bool(call.messages) and call.messages[-1].get("role") == "assistant"
        verdict.prefills += continued
        verdict.prefills_refused += continued and refusal(call.path, call.body) is not None
        if job_id in first_call:
            kind = "continuation" if continued else "fresh call"
            verdict.prompt_again[kind] = verdict.prompt_again.get(kind, 0) + prompt
        first_call.add(job_id)
        if job_id in done_at and call.wall_at > done_at[job_id] + 0.05:
            verdict.after_done += 1
            verdict.note(job_id, "a model call after its done")
        if call.finished and call.tokens_sent and not call.disconnected and not call.cut:
            full_answers[job_id] = full_answers.get(job_id, 0) + 1
    verdict.answered_twice = sum(n > 1 for n in full_answers.values())
    return verdict


def _count_takeovers(verdict: Verdict, entries: list[dict[str, str]]) -> None:
    """Each later attempt's `started`: resumed (the kept text's words are vendor tokens
    not paid again: the scripted vendor's tokens are words) or restarted, and why."""
    client = Assembled()
    for f in entries:
        data = json.loads(f["data"])
        if f["event"] == "started" and int(f["attempt"]) > 1:
            if "resumes" in data:
                verdict.resumed += 1
                kept = client.texts.get(data["resumes"]["attempt"], "")
                verdict.tokens_saved += len(kept[:data["resumes"]["chars"]].split())
            elif "restarts" in data:
                reason = data["restarts"]["reason"]
                verdict.restarted[reason] = verdict.restarted.get(reason, 0) + 1
        client.add(f["event"], int(f["attempt"]), data)


def _count_paid(verdict: Verdict, job_id: str, entries: list[dict[str, str]]) -> None:
    """Answer tokens streamed twice. Every vendor answer begins with its own number
    (NumberedLLM): within one attempt's own tokens a second number is an answer begun
    again after the client was shown one; the text of an attempt a later one restarts
    was paid for and thrown away, for its reason."""
    own: dict[int, str] = {}
    for f in entries:
        if f["event"] == "token":
            own[int(f["attempt"])] = own.get(int(f["attempt"]), "") + json.loads(f["data"])["text"]
    for attempt, text in own.items():
        begun = [m.start() for m in re.finditer(r"#\d+ ", text)]
        if len(begun) > 1:
            verdict.paid_twice += len(text[begun[1]:].split())
            verdict.note(job_id, f"attempt {attempt} began its answer again: {text!r}")
    for f in entries:
        if f["event"] == "started" and int(f["attempt"]) > 1:
            restarts = json.loads(f["data"]).get("restarts")
            if isinstance(restarts, dict):
                thrown = len(own.get(int(restarts.get("attempt", 0)), "").split())
                reason = str(restarts.get("reason"))
                verdict.paid_again[reason] = verdict.paid_again.get(reason, 0) + thrown


def _check_stream(verdict: Verdict, job_id: str, entries: list[dict[str, str]]) -> None:
    dones = sum(f["event"] == "done" for f in entries)
    verdict.one_done += dones == 1
    verdict.lost += dones == 0
    if dones > 1:
        verdict.note(job_id, f"{dones} dones")
    by_attempt: dict[str, list[int]] = {}
    newest = 0  # the highest attempt that said `started` so far
    stale = False
    for f in entries:
        by_attempt.setdefault(f["attempt"], []).append(int(f["seq"]))
        if f["event"] == "started":
            newest = max(newest, int(f["attempt"]))
        stale |= int(f["attempt"]) < newest
    if stale:
        verdict.stale += 1
        verdict.note(job_id, "events of a superseded attempt after a later started: "
                             + " ".join(f"{f['event']}@{f['attempt']}" for f in entries))
    if any(seqs != list(range(len(seqs))) for seqs in by_attempt.values()):
        verdict.gaps += 1
        verdict.note(job_id, f"seqs by attempt {by_attempt}")


def uncommitted_partitions(bootstrap: str, topic: str, group: str) -> int:
    """Partitions whose committed offset is behind their end: a message nobody settled."""
    consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                         "enable.auto.commit": False,
                                         "log.connection.close": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed(
            [confluent_kafka.TopicPartition(topic, p) for p in partitions], timeout=10)
        short = 0
        for tp in committed:
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            short += high > low and tp.offset < high  # (never committed: offset < 0)
        return short
    finally:
        consumer.close()
