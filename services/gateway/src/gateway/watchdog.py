"""The relay's watchdog: what keeps relayed jobs honest when nothing arrives.

Every tick it checks the jobs this process relays that have been silent for a tick: it
ends those whose worker stopped its heartbeat after output or that no worker started in
time (the end is written to the stream, so every reader on every gateway sees the same
final event), enqueues again those whose worker died before any output, and tells readers
of jobs Redis no longer knows. It does the same for jobs nobody reads whose heartbeat
lapsed (``sg:running``) or that waited past the queue timeout (``sg:pending``): a POST
job's worker may die with nobody watching. And it keeps relayed jobs marked as watched, so
that a ``GET /chat`` job with readers is not cancelled. The per-job work is batched: one
MGET, or one script call, per thousand jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from shared import keys
from shared.lua import Scripts

if TYPE_CHECKING:
    from .relay import Relay

logger = logging.getLogger(__name__)

WATCH_BATCH = 1000  # jobs per script call or MGET

# Marks every key in KEYS watched for ARGV[1] ms: one call for a thousand relayed jobs,
# where a SET each cost the gateway ~20 µs of CPU per job and renewal.
RENEW_WATCHED = """
for _, key in ipairs(KEYS) do redis.call('SET', key, '1', 'PX', ARGV[1]) end
return #KEYS
"""


class Watchdog:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.redis = relay.redis
        self.log = relay.log
        self.settings = relay.settings
        self.metrics = relay.metrics
        self._scripts = Scripts(relay.redis)

    async def run(self) -> None:
        s = self.settings
        renew_every = s.disconnect_grace_s / 3
        tick = min(s.watch_tick_s, renew_every)
        last_renew = 0.0
        loop_time = asyncio.get_running_loop().time  # the relay's clock
        while True:
            await asyncio.sleep(tick)
            now = loop_time()
            try:
                if now - last_renew >= renew_every:
                    await self._renew_watched()
                    last_renew = now
                await self._check_idle(now - tick)
                await self._check_unread()
            except RedisError as exc:
                logger.debug("relay watchdog: Redis unreachable (%s)", exc)
            down = self.relay.redis_down_since
            # Long enough for Redis to restart, so a reader learns whether its job survived.
            if down is not None and now - down > max(30.0, 2 * s.worker_lost_timeout_s):
                # Streams may resume once Redis is back: close cleanly, clients reconnect.
                logger.warning(
                    "Redis down for %.0f s: closing %d streams", now - down, self.relay.open_readers
                )
                self.relay.close_all()

    async def _renew_watched(self) -> None:
        if not self.relay.jobs:
            return
        # Generous: a busy gateway may renew late. The grace proper starts when the last
        # reader leaves (``unsubscribe`` sets the key to exactly DISCONNECT_GRACE_S).
        grace_ms = int((self.settings.disconnect_grace_s * 3 + 5) * 1000)
        watched = [keys.watched_key(job_id) for job_id in self.relay.jobs]
        calls = [
            (watched[start : start + WATCH_BATCH], [grace_ms])
            for start in range(0, len(watched), WATCH_BATCH)
        ]
        await self._scripts.run_all(RENEW_WATCHED, calls)

    async def _check_unread(self) -> None:
        """Jobs whose heartbeat lapsed, or that waited past the queue timeout, whether or
        not anyone reads them: a POST job's worker may die with nobody watching."""
        now_ms = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(keys.RUNNING, "-inf", now_ms, start=0, num=200)
            pipe.zrangebyscore(
                keys.PENDING,
                "-inf",
                now_ms - int(self.settings.queue_timeout_s * 1000),
                start=0,
                num=200,
            )
            lapsed, late = await pipe.execute()
        job_ids = {i.decode().split(".", 1)[0] for i in [*lapsed, *late]} - set(self.relay.jobs)
        if not job_ids:
            return
        results = await self.log.check_stalled(sorted(job_ids))
        for job_id, result in results.items():
            self._count(job_id, result)
        async with self.redis.pipeline(transaction=False) as pipe:
            # Checked: each has ended, or is queued again, or (alive after all) is indexed
            # again by its worker's next heartbeat; none can start late.
            if lapsed:
                pipe.zrem(keys.RUNNING, *lapsed)
            if late:
                pipe.zrem(keys.PENDING, *late)
            await pipe.execute()

    def _count(self, job_id: str, result: int) -> None:
        if result in (1, 3, 4):
            outcome = {1: "worker_lost", 3: "expired", 4: "error"}[result]
            self.metrics.jobs.labels(outcome).inc()
        if result == 2:
            logger.warning(
                "its worker died before any output; queued to run again", extra={"job_id": job_id}
            )

    async def _check_idle(self, idle_since: float) -> None:
        idle = self.relay.idle_since(idle_since)
        if not idle:
            return
        self.relay.sweep(idle)
        # A job whose worker's heartbeat is alive needs no check: one MGET tells them
        # apart, so slow streams (a token a second, thousands of them) cost no script each.
        async with self.redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(idle), WATCH_BATCH):
                pipe.mget([keys.alive_key(job_id) for job_id in idle[start : start + WATCH_BATCH]])
            alive = [v for batch in await pipe.execute() for v in batch]
        idle = [job_id for job_id, beating in zip(idle, alive, strict=True) if beating is None]
        if not idle:
            return
        for job_id, result in (await self.log.check_stalled(idle)).items():
            self._count(job_id, result)
            if result == -1:
                self.relay.end_lost(job_id)
