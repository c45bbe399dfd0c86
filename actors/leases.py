"""leases: one actor keeps every running job's lease in llm_jobs alive.

A lease says "this worker is running this job until lease_until". Renewing
each job's lease on its own timer is one Postgres round trip per job every
lease_s / 3: at five thousand streams, hundreds of transactions a second and a
task per job. The keeper renews all the leases this worker holds with one
UPDATE per period instead. A job the UPDATE does not return was taken over by
another attempt after an outage (or a frozen worker) outlived its lease: it is
stopped at once (`on_lost`), and its terminal record, fenced by attempt, writes
nothing (contract 6.11).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from actors.backoff import DependencyHealth
from actors.errors import TransientError
from actors.ports import JobStore

log = logging.getLogger("chat_actors.leases")


class LeaseKeeper:
    def __init__(self) -> None:
        self._held: set[str] = set()

    def hold(self, job_id: str) -> None:
        self._held.add(job_id)

    def drop(self, job_id: str) -> None:
        self._held.discard(job_id)

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    async def run(self, store: JobStore, *, lease_holder: str, lease_s: float,
                  health: DependencyHealth | None = None,
                  on_lost: Callable[[str], None] | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(lease_s / 3)
            await self.renew(store, lease_holder=lease_holder, lease_s=lease_s, health=health,
                             on_lost=on_lost)

    async def renew(self, store: JobStore, *, lease_holder: str, lease_s: float,
                    health: DependencyHealth | None = None,
                    on_lost: Callable[[str], None] | None = None) -> None:
        job_ids = sorted(self._held)
        if not job_ids:
            return
        try:
            renewed = await store.renew_leases(job_ids=job_ids, lease_holder=lease_holder,
                                               lease_s=lease_s)
        except TransientError as exc:
            # The next period tries again; a lease is three periods long.
            log.warning("renewing %d leases failed (%s); retrying", len(job_ids), exc)
            if health is not None:
                health.failed("postgres", exc)
            return
        if health is not None:
            health.recovered("postgres")
        for job_id in job_ids:
            if job_id not in renewed and job_id in self._held:
                log.warning("job %s: lease lost to a later attempt; stopping it", job_id)
                self._held.discard(job_id)
                if on_lost is not None:
                    on_lost(job_id)
