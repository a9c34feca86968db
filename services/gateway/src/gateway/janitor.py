"""The fleet-wide sweep: jobs nobody may be reading. A POST job's worker may die with no
reader to notice, and a job may wait past the queue timeout with nobody watching: every
tick the janitor lists running attempts whose heartbeat lapsed and arq ids that waited too
long (the library's ``due``, on Redis's clock) and checks each job (``check``), which ends
it, queues it again, or leaves it be, and drops the index entries it no longer needs in
the same step. Every gateway runs a janitor; one at a time sweeps, holding a lease that
another takes over within three ticks of its holder dying.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from redis.exceptions import RedisError

from shared.event_log import EventLog, pending_job, running_job
from shared.timing import Timing

from .metrics import GatewayMetrics, count_check

logger = logging.getLogger(__name__)

DUE_LIMIT = 200  # entries of each index per sweep; the next tick takes the rest


class Janitor:
    def __init__(self, log: EventLog, metrics: GatewayMetrics, timing: Timing) -> None:
        self.log = log
        self.metrics = metrics
        self.timing = timing
        self.name = f"gateway-{secrets.token_hex(6)}"

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.timing.watch_tick_s)
            try:
                if await self.hold_lease():
                    await self.sweep()
            except RedisError as exc:
                logger.debug("janitor: Redis unreachable (%s)", exc)

    async def hold_lease(self) -> bool:
        args: list[bytes | str | int] = [self.name, self.timing.janitor_lease_ms]
        return bool(await self.log.functions.call("lease", [self.log.keys.janitor], args))

    async def sweep(self) -> int:
        """One sweep; returns how many entries it checked."""
        lapsed, late = await self.log.due(DUE_LIMIT)
        entries = [(running_job(m), m, b"") for m in lapsed]
        entries += [(pending_job(m), b"", m) for m in late]
        if not entries:
            return 0
        results = await self.log.check_stalled(
            [job_id for job_id, _, _ in entries], [(r, p) for _, r, p in entries]
        )
        for job_id, result in results.items():
            count_check(self.metrics, job_id, result)
        return len(entries)
