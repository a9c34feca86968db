"""Event-driven job pickup on top of arq, which only polls.

arq's worker polls its queue every ``poll_delay`` and, on each poll, re-checks every job
still in the queue, those running included (~4 commands each). Here an idle worker instead
blocks on the ``WAKE`` list that the gateway pushes to after each enqueue, and on waking
looks only at the jobs that are waiting (the ``PENDING`` set), so a job starts a few
milliseconds after it is enqueued. The full arq poll still runs every ``poll_delay`` as a
fallback (arq's own retries, a lost wake-up), with jobs that are known to run skipped in one
pipelined check. The loop also rides out Redis outages instead of exiting, so a worker
needs no restart when Redis comes back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from arq.connections import create_pool
from arq.constants import in_progress_key_prefix
from arq.worker import Worker
from redis.exceptions import RedisError

from shared import keys
from shared.redis_conn import connect

logger = logging.getLogger(__name__)


class PushWorker(Worker):
    def __init__(self, *args: Any, wake_redis_url: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wake_redis = connect(
            wake_redis_url, socket_connect_timeout=2, socket_timeout=self.poll_delay_s + 5
        )

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await create_pool(
                self.redis_settings,
                job_deserializer=self.job_deserializer,
                job_serializer=self.job_serializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        next_full_poll = 0.0
        delay = 0.1
        while True:
            try:
                if time.monotonic() >= next_full_poll:
                    await self._poll_iteration()
                    next_full_poll = time.monotonic() + self.poll_delay_s
                else:
                    await self._start_waiting()
                await self._idle_until_woken(next_full_poll - time.monotonic())
                delay = 0.1
            except (RedisError, OSError) as exc:
                logger.warning("worker lost Redis (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _free_slots(self) -> int:
        return self.max_jobs - self.job_counter if self.allow_pick_jobs else 0

    async def _idle_until_woken(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            return
        if self._free_slots() <= 0:
            await asyncio.sleep(min(timeout_s, 0.05))  # full: wake-ups are for idle workers
            return
        await self.wake_redis.blpop([keys.WAKE], timeout=timeout_s)  # type: ignore[arg-type,misc]

    async def _start_waiting(self) -> None:
        slots = self._free_slots()
        if slots <= 0:
            return
        job_ids = await self.pool.zrange(keys.PENDING, 0, slots * 2 - 1)
        if job_ids:
            await self.start_jobs(job_ids)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # Skip, in one round trip, the jobs that already run here or elsewhere.
        candidates = [j for j in job_ids if j.decode() not in self.tasks]
        if not candidates:
            return
        async with self.pool.pipeline(transaction=False) as pipe:
            for job_id in candidates:
                pipe.exists(in_progress_key_prefix + job_id.decode())
            running = await pipe.execute()
        waiting = [j for j, busy in zip(candidates, running, strict=True) if not busy]
        if waiting:
            await super().start_jobs(waiting)

    async def close(self) -> None:
        await super().close()
        await self.wake_redis.aclose()
