"""intake: chat.request -> validate -> admit -> one conversation per job.

Offsets: each delivery is tracked; a job settles when its conversation returns
(terminal in Postgres, `done` in Redis) and the highest contiguous settled
offset per partition is committed after every poll. Never auto-commit.

Admission: at most `jobs.max_in_flight` jobs run. At the limit the intake
pauses its partitions but keeps polling, so the consumer group never sees it
as gone however long the jobs take (DESIGN 4.8). Requests of one session run
in arrival order, each seeing the previous one in its history.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from functools import partial

import msgspec
import trio

from actors.backoff import Backoff, retry_transient
from actors.conversation import Worker, run_conversation
from actors.errors import PermanentError, TransientError
from actors.logs import job_context
from actors.offsets import OffsetTracker
from actors.ports import DeadLetters, RequestSource
from messages.mailboxes import Delivery, JobRef, JobRejected
from messages.wire import BadInput, ChatRequest, Done, Error, decode_request

log = logging.getLogger("chat_actors.intake")

POLL_TIMEOUT_S = 0.1


class SessionOrder:
    """Per (user, session): each job waits for the one admitted before it."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], trio.Event] = {}

    def enter(self, key: tuple[str, str]) -> tuple[trio.Event | None, trio.Event]:
        previous = self._last.get(key)
        mine = trio.Event()
        self._last[key] = mine
        return previous, mine

    def leave(self, key: tuple[str, str], mine: trio.Event) -> None:
        mine.set()
        if self._last.get(key) is mine:
            del self._last[key]


_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_id_from(headers: tuple[tuple[str, bytes], ...]) -> str | None:
    """The trace id of a W3C `traceparent` header, when the request carries one."""
    for name, value in headers:
        if name.lower() == "traceparent":
            match = _TRACEPARENT.match(value.decode("ascii", "replace").strip())
            if match and match.group(1) != "0" * 32:
                return match.group(1)
    return None


async def reject(delivery: Delivery, problem: BadInput, worker: Worker, dlq: DeadLetters,
                 dlq_topic: str) -> None:
    """Bad input: DLQ (unchanged, with why), then tell the job's stream and table if named."""
    ids = {k: v for k, v in (("job_id", problem.job_id), ("user_id", problem.user_id),
                             ("session_id", problem.session_id)) if v}
    with job_context(**ids):
        log.warning("bad request at %s[%d]@%d: %s", delivery.topic, delivery.partition,
                    delivery.offset, problem)
    worker.metrics.rejections.labels(reason="bad_input").inc()
    headers = [*delivery.headers,
               ("error.class", b"BadInput"),
               ("error.message", str(problem).encode()),
               ("source.topic", delivery.topic.encode()),
               ("source.partition", str(delivery.partition).encode()),
               ("source.offset", str(delivery.offset).encode())]
    await retry_transient(lambda: dlq.send(dlq_topic, delivery.value, key=delivery.key,
                                           headers=headers),
                          what="DLQ produce", log=log, health=worker.health, dependency="kafka")
    if problem.job_id and problem.user_id:
        session_id = problem.session_id or ""
        job = JobRef(job_id=problem.job_id, user_id=problem.user_id, session_id=session_id,
                     attempt=1, stream_key=worker.stream_key(problem.job_id))
        persisted = trio.Event()
        await worker.records.send(JobRejected(job_id=job.job_id, user_id=job.user_id,
                                              session_id=session_id, error=str(problem),
                                              receipt=persisted))
        await persisted.wait()
        await worker.emit(job, Error(code="bad_request", message=str(problem), retryable=False))
        await worker.emit(job, Done(status="rejected", partial=False), wait=True)


async def run_intake(
    source: RequestSource,
    dlq: DeadLetters,
    worker: Worker,
    tracker: OffsetTracker,
    *,
    stop: trio.Event,
    run_job: Callable[[ChatRequest, Worker], Awaitable[None]] = run_conversation,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Consume until `stop` is set; then drain running jobs within shutdown.grace_s."""
    config = worker.config
    aliases = frozenset(config.llm.models)
    max_in_flight = config.jobs.max_in_flight
    low_water = max_in_flight * 3 // 4
    in_flight = 0
    paused = False
    sessions = SessionOrder()
    poll_backoff = Backoff(cap_s=5.0)
    poll_failures = 0

    async def settle_after(delivery: Delivery, job: Callable[[], Awaitable[None]]) -> None:
        nonlocal in_flight
        partition = (delivery.topic, delivery.partition)
        try:
            await job()
        except (TransientError, PermanentError) as exc:
            # Not settled: the offset stays uncommitted and the request is redelivered.
            log.error("job at %s[%d]@%d not settled: %s", *partition, delivery.offset, exc)
        else:
            tracker.settle(partition, delivery.offset)
        finally:
            in_flight -= 1

    async def ordered(request: ChatRequest, previous: trio.Event | None,
                      mine: trio.Event) -> None:
        key = (request.user_id, request.session_id)
        try:
            if previous is not None:
                await previous.wait()
            await run_job(request, worker)
        finally:
            sessions.leave(key, mine)

    def admit(delivery: Delivery, jobs: trio.Nursery) -> None:
        nonlocal in_flight
        tracker.track((delivery.topic, delivery.partition), delivery.offset)
        in_flight += 1
        try:
            request = decode_request(delivery.value, model_aliases=aliases,
                                     max_message_chars=config.limits.max_message_chars)
        except BadInput as problem:
            # `problem` is unbound when the except block ends: bind it now.
            jobs.start_soon(settle_after, delivery,
                            partial(reject, delivery, problem, worker, dlq, config.kafka.dlq_topic))
            return
        if request.trace_id is None:
            trace_id = trace_id_from(delivery.headers)
            if trace_id is not None:
                request = msgspec.structs.replace(request, trace_id=trace_id)
        previous, mine = sessions.enter((request.user_id, request.session_id))
        jobs.start_soon(settle_after, delivery, lambda: ordered(request, previous, mine))

    async def commit_settled() -> None:
        commits = tracker.take_commits()
        if commits:
            try:
                await source.commit(commits)
            except TransientError as exc:
                log.warning("commit failed (%s); the jobs may be redelivered", exc)

    with worker.events, worker.records:
        async with trio.open_nursery() as jobs:
            task_status.started()
            while not stop.is_set():
                if not paused and in_flight >= max_in_flight:
                    await source.pause()
                    paused = True
                elif paused and in_flight <= low_water:
                    await source.resume()
                    paused = False
                room = max(0, max_in_flight - in_flight)
                try:
                    batch = await source.poll(min(config.kafka.poll_batch, max(room, 1)),
                                              POLL_TIMEOUT_S)
                except TransientError as exc:
                    worker.health.failed("kafka", exc)
                    poll_failures += 1
                    wait = poll_backoff.delay(poll_failures)
                    log.warning("poll failed (%s); retry in %.2fs", exc, wait)
                    await trio.sleep(wait)
                    continue
                if poll_failures:
                    worker.health.recovered("kafka")
                poll_failures = 0
                if room < len(batch):
                    # Fetched before the pause took effect: read them again later.
                    await source.seek(batch[room:])
                    batch = batch[:room]
                for delivery in batch:
                    admit(delivery, jobs)
                await commit_settled()

            # Draining: admit nothing more, keep polling (group membership), and give
            # running jobs shutdown.grace_s before cancelling them uncommitted.
            worker.health.draining = True
            log.info("intake stopping; %d job(s) running", in_flight)
            await source.pause()
            with trio.move_on_after(config.shutdown.grace_s or 0):
                while in_flight:
                    await source.poll(1, POLL_TIMEOUT_S)
                    await commit_settled()
            jobs.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await commit_settled()
            await source.close()
    log.info("intake stopped; unsettled deliveries: %d", tracker.unsettled())


