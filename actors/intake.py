"""intake: chat.request -> validate -> admit -> one conversation per job.

Offsets: each delivery is tracked; a job settles when its conversation returns
(terminal in Postgres, `done` in Redis) and the highest contiguous settled
offset per partition is committed after every poll. Never auto-commit.

Admission: at most `jobs.max_in_flight` jobs run, and at most the tracker's
limit of offsets wait to be committed. At either limit the intake pauses its
partitions but keeps polling, so the consumer group never sees it as gone
however long the jobs take (contract 6.8). Requests of one session run
in arrival order, each seeing the previous one in its history.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from functools import partial

import msgspec
import trio

from actors.aliases import check_capabilities
from actors.backoff import Backoff, retry_transient
from actors.errors import PermanentError, TransientError
from actors.job import run_conversation
from actors.logs import job_context
from actors.offsets import OffsetTracker
from actors.polling import Poller
from actors.ports import DeadLetters, RequestSource
from actors.telemetry import traceparent_of
from actors.worker import FINISH_GRACE_S, Worker
from messages.mailboxes import Delivery, JobRef, JobRejected, Receipt
from messages.wire import BadInput, ChatRequest, Done, Error

log = logging.getLogger("chat_actors.intake")

# A job's run: the request, the worker, and the request's W3C traceparent (None: none).
RunJob = Callable[[ChatRequest, Worker, str | None], Awaitable[None]]

ADMIT_STEP = 64  # deliveries decoded between two checkpoints


class SessionOrder:
    """Per (user, session): each job waits for the one admitted before it, and at most
    `queue_max` wait at once (the running one not counted)."""

    def __init__(self, queue_max: int) -> None:
        self.queue_max = queue_max
        self._last: dict[tuple[str, str], trio.Event] = {}
        self._waiting: dict[tuple[str, str], int] = {}

    def enter(self, key: tuple[str, str]) -> tuple[trio.Event | None, trio.Event] | None:
        """The event to wait for (None: run now) and this job's own; None when the
        session's queue is full."""
        previous = self._last.get(key)
        if previous is not None:
            if self._waiting.get(key, 0) >= self.queue_max:
                return None
            self._waiting[key] = self._waiting.get(key, 0) + 1
        mine = trio.Event()
        self._last[key] = mine
        return previous, mine

    def stop_waiting(self, key: tuple[str, str]) -> None:
        left = self._waiting[key] - 1
        if left:
            self._waiting[key] = left
        else:
            del self._waiting[key]

    def leave(self, key: tuple[str, str], mine: trio.Event) -> None:
        mine.set()
        if self._last.get(key) is mine:
            del self._last[key]

    def waiting(self) -> int:
        return sum(self._waiting.values())


async def reject(delivery: Delivery, problem: BadInput, worker: Worker, dlq: DeadLetters) -> None:
    """Bad input: DLQ (unchanged, with why), then tell the job's stream and table if named,
    and only if that job id is free or already this user's rejection."""
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

    async def dead_letter() -> None:
        await dlq.send(worker.config.kafka.dlq_topic, delivery.value, key=delivery.key,
                       headers=headers)

    await retry_transient(dead_letter, what="DLQ produce", log=log, health=worker.health,
                          dependency="kafka")
    if problem.job_id and problem.user_id:
        job = worker.job_ref(problem.job_id, problem.user_id, problem.session_id or "")
        await refuse(worker, job, Error(code="bad_request", message=str(problem),
                                        retryable=False))


async def refuse(worker: Worker, job: JobRef, error: Error) -> None:
    """End a job that never ran as `rejected`: its row first, then `error` and `done`,
    all only if the row landed (contract 2.2: nothing is written to another's job)."""
    persisted = Receipt()
    await worker.records.send(JobRejected(job_id=job.job_id, user_id=job.user_id,
                                          session_id=job.session_id,
                                          error=f"{error.code}: {error.message}",
                                          receipt=persisted))
    await persisted.wait()
    if persisted.superseded:
        log.warning("job %s: not told it was rejected, the id is another job's", job.job_id)
        return
    await worker.emit(job, error)
    await worker.emit(job, Done(status="rejected", partial=False), wait=True)


class Intake:
    """The intake's state: jobs in flight, whether the partitions are paused, the
    order of each session's jobs, and which offsets may be committed."""

    def __init__(self, source: RequestSource, dlq: DeadLetters, worker: Worker,
                 tracker: OffsetTracker, run_job: RunJob) -> None:
        self.source = source
        self.dlq = dlq
        self.worker = worker
        self.tracker = tracker
        self.run_job = run_job
        # Resolved here, at the intake's start, not on its first request's hot path.
        self.aliases = worker.aliases
        self.max_in_flight = worker.config.jobs.max_in_flight
        self.low_water = self.max_in_flight * 3 // 4
        self.in_flight = 0  # jobs running, not those waiting behind their session
        self.paused = False
        self.sessions = SessionOrder(worker.config.jobs.session_queue_max)
        self.poller = Poller(source, what="request", log=log, health=worker.health)

    async def run(self, stop: trio.Event, task_status: trio.TaskStatus[None]) -> None:
        worker = self.worker
        with worker.events, worker.records:
            async with trio.open_nursery() as jobs:
                task_status.started()
                while not stop.is_set():
                    await self.flow_control()
                    for n, delivery in enumerate(await self.poll(), 1):
                        self.admit(delivery, jobs)
                        if n % ADMIT_STEP == 0:  # a batch of large bad values is decoded
                            await trio.lowlevel.checkpoint()  # in steps, not one stall
                    await self.commit_settled()
                await self.drain()
                jobs.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await self.commit_settled(wait=False)  # leaving: see RequestConsumer.commit
                await self.source.close()
        log.info("intake stopped; unsettled deliveries: %d", self.tracker.unsettled())

    async def flow_control(self) -> None:
        """Pause the partitions at either limit (jobs in flight, offsets tracked);
        resume below both low-water marks."""
        tracker = self.tracker
        if not self.paused and (self.in_flight >= self.max_in_flight or not tracker.room()):
            await self.source.pause()
            self.paused = True
        elif (self.paused and self.in_flight <= self.low_water
              and tracker.unsettled() <= tracker.limit * 3 // 4):
            await self.source.resume()
            self.paused = False

    async def poll(self) -> list[Delivery]:
        room = max(0, min(self.max_in_flight - self.in_flight, self.tracker.room()))
        batch = await self.poller.poll(min(self.worker.config.kafka.poll_batch, max(room, 1)))
        if room < len(batch):
            # Fetched before the pause took effect: read them again later.
            await self.source.seek(batch[room:])
            batch = batch[:room]
        return batch

    async def drain(self) -> None:
        """Admit nothing more, keep polling (group membership), and give running jobs
        shutdown.grace_s before they are cancelled with their offsets uncommitted."""
        self.worker.health.draining = True
        log.info("intake stopping; %d job(s) running", self.in_flight)
        await self.source.pause()
        with trio.move_on_after(self.worker.config.shutdown.grace_s or 0):
            while self.in_flight or self.sessions.waiting():
                await self.poller.poll(1)
                await self.commit_settled()
        # Jobs still waiting for Postgres now get a bounded time to settle.
        self.worker.finishing.bound(FINISH_GRACE_S)

    def admit(self, delivery: Delivery, jobs: trio.Nursery) -> None:
        self.tracker.track((delivery.topic, delivery.partition), delivery.offset)
        try:
            request = self.worker.config.decode_request(delivery.value)
            check_capabilities(request, self.aliases.chain(request.model))
        except BadInput as problem:
            # `problem` is unbound when the except block ends: bind it now.
            self.in_flight += 1
            jobs.start_soon(self.settle_counted, delivery,
                            partial(reject, delivery, problem, self.worker, self.dlq))
            return
        parent = traceparent_of(delivery.headers)
        if request.trace_id is None and parent is not None:  # the logs carry the trace's id
            request = msgspec.structs.replace(request, trace_id=parent.split("-")[1])
        turn = self.sessions.enter((request.user_id, request.session_id))
        if turn is None:
            self.in_flight += 1
            jobs.start_soon(self.settle_counted, delivery, partial(
                self.busy, request,
                f"{self.sessions.queue_max} requests of this session already wait for their turn"))
            return
        previous, mine = turn
        if previous is None:
            self.in_flight += 1  # it runs now: counted before the next poll's room
        jobs.start_soon(self.in_order, delivery, request, parent, previous, mine)

    async def settle_counted(self, delivery: Delivery,
                             job: Callable[[], Awaitable[None]]) -> None:
        """settle_after for a job counted in `in_flight` (max_in_flight bounds them)."""
        try:
            await self.settle_after(delivery, job)
        finally:
            self.in_flight -= 1

    async def in_order(self, delivery: Delivery, request: ChatRequest, parent: str | None,
                       previous: trio.Event | None, mine: trio.Event) -> None:
        """Run the job once the session's previous job has settled. The wait holds no
        in-flight slot and is bounded by jobs.session_wait_s; the job's own timeout
        starts when it starts."""
        key = (request.user_id, request.session_id)
        try:
            if previous is not None:
                wait_s = self.worker.config.jobs.session_wait_s
                try:
                    with trio.move_on_after(wait_s):
                        await previous.wait()
                finally:
                    self.sessions.stop_waiting(key)
                self.in_flight += 1
                if not previous.is_set():
                    await self.settle_counted(delivery, partial(
                        self.busy, request, f"it waited {wait_s:g} s behind an earlier "
                        "request of its session"))
                    await previous.wait()  # the session's next request still waits for it
                    return
            await self.settle_counted(delivery, partial(self.run_job, request, self.worker,
                                                        parent))
        finally:
            self.sessions.leave(key, mine)

    async def busy(self, request: ChatRequest, why: str) -> None:
        """Refuse a valid request its session cannot take now; the client may resend."""
        log.warning("job %s refused: %s", request.job_id, why)
        self.worker.metrics.rejections.labels(reason="session_busy").inc()
        job = self.worker.job_ref(request.job_id, request.user_id, request.session_id)
        await refuse(self.worker, job, Error(
            code="session_busy", retryable=True, retry_after_s=2.0,
            message=f"the session is busy: {why}; send it again once the earlier ones end"))

    async def settle_after(self, delivery: Delivery, job: Callable[[], Awaitable[None]]) -> None:
        """Run the job until it settles. A job that could not settle (a bug, or its
        terminal write cut short) is run again after a capped backoff, never dropped:
        that partition's committed offset must go on. The run again is safe, since
        every write is fenced by attempt (contract 6.11). Only a stopping worker leaves
        it unsettled, for the redelivery."""
        partition = (delivery.topic, delivery.partition)
        backoff = Backoff(base_s=1.0, cap_s=30.0)
        for tries in itertools.count(1):
            try:
                await job()
            except Exception as exc:
                expected = isinstance(exc, (TransientError, PermanentError))
                if not expected:  # a bug outside the job's answer: this job only
                    self.worker.metrics.internal_errors.labels(where="intake").inc()
                if self.worker.health.draining:
                    log.error("job at %s[%d]@%d not settled before the worker stopped: %s",
                              *partition, delivery.offset, exc, exc_info=not expected)
                    return  # its offset stays uncommitted: it is redelivered
                wait = backoff.delay(tries)
                log.error("job at %s[%d]@%d not settled (%s); running it again in %.1f s",
                          *partition, delivery.offset, exc, wait, exc_info=not expected)
                await trio.sleep(wait)
                continue
            self.tracker.settle(partition, delivery.offset)
            return

    async def commit_settled(self, *, wait: bool = True) -> None:
        commits = self.tracker.take_commits()
        if commits:
            try:
                await self.source.commit(commits, wait=wait)
            except TransientError as exc:
                # Offered again after the next poll: a partition that gets no more
                # messages must still commit to its end.
                self.tracker.retry_commits(commits)
                log.warning("commit failed (%s); trying again after the next poll", exc)


async def run_intake(source: RequestSource, dlq: DeadLetters, worker: Worker,
                     tracker: OffsetTracker, *, stop: trio.Event,
                     run_job: RunJob = run_conversation,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Consume until `stop` is set; then drain running jobs within shutdown.grace_s."""
    await Intake(source, dlq, worker, tracker, run_job).run(stop, task_status)
