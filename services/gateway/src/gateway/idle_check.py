"""The relay's look at its own silent jobs: every tick, each relayed job that delivered
nothing for ``idle_check_after_s`` (for a tick, after the relay's Redis failed) and whose
worker's heartbeat has lapsed is checked in Redis (the library's ``check``). It ends those
whose worker stopped after output or that no worker started in time (the end is written to
the stream, so every reader on every gateway sees the same final event), queues again
those whose worker died before any output, and tells this gateway's readers of jobs Redis
no longer knows.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from shared.event_log import EventLog
from shared.timing import Timing

from .metrics import GatewayMetrics, count_check
from .relay import Relay

logger = logging.getLogger(__name__)


class IdleCheck:
    def __init__(
        self, relay: Relay, log: EventLog, metrics: GatewayMetrics, timing: Timing
    ) -> None:
        self.relay = relay
        self.log = log
        self.metrics = metrics
        self.tick = timing.watch_tick_s
        self.after_s = timing.idle_check_after_s
        self._failures_seen = 0

    async def run(self) -> None:
        loop_time = asyncio.get_running_loop().time  # the relay's clock
        # After a read failure, when it was noticed: every job silent for a tick is checked
        # until a check gets through that covers those whose events stopped with it (they
        # were not silent for a tick yet at the first check after it).
        failed_at: float | None = None
        while True:
            await asyncio.sleep(self.tick)
            now = loop_time()
            if (failures := self.relay.read_failures) != self._failures_seen:
                self._failures_seen, failed_at = failures, now
            try:
                await self.check(now, self.after_s if failed_at is None else self.tick)
            except RedisError as exc:
                logger.debug("idle check: Redis unreachable (%s)", exc)
            else:
                if failed_at is not None and now - self.tick >= failed_at:
                    failed_at = None

    async def check(self, now: float, after_s: float) -> None:
        """Sweep the jobs silent for a tick; check those silent for ``after_s``."""
        idle = self.relay.idle_since(now - self.tick)
        if not idle:
            return
        self.relay.sweep(idle)
        if after_s > self.tick:
            jobs = self.relay.jobs
            idle = [j for j in idle if jobs[j].last_activity <= now - after_s]
            if not idle:
                return
        # A job whose worker's heartbeat is alive needs no check: one read-only call tells
        # them apart, so slow streams (a token a second, thousands of them) cost no check.
        beats = await self.log.beating(idle)
        idle = [job_id for job_id, beating in zip(idle, beats, strict=True) if not beating]
        if not idle:
            return
        for job_id, result in (await self.log.check_stalled(idle)).items():
            count_check(self.metrics, job_id, result)
            if result == -1:
                self.relay.end_lost(job_id)
