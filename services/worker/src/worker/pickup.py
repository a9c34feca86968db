"""Event-driven job pickup on top of arq, which only polls.

arq's worker polls its queue every ``poll_delay`` and, on each poll, re-checks every job
still in the queue, those running included (~4 round trips each). Here an idle worker
blocks on the ``WAKE`` list instead, to which the gateway pushes each new job's arq id: the
worker that pops it starts it at once, in one round trip (``start_jobs``), a few
milliseconds after the enqueue. arq's full poll still runs every ``poll_delay`` as a
fallback (arq's own retries, a lost wake-up), through the same ``start_jobs``. The loop
also rides out Redis outages instead of exiting, so a worker needs no restart when Redis
comes back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

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
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        self._start_script = self.pool.register_script(_START)
        next_full_poll = 0.0
        delay = 0.1
        while True:
            try:
                if time.monotonic() >= next_full_poll:
                    await self._poll_iteration()
                    next_full_poll = time.monotonic() + self.poll_delay_s
                woken = await self._idle_until_woken(next_full_poll - time.monotonic())
                if woken:
                    await self.start_jobs(woken)
                delay = 0.1
            except (RedisError, OSError) as exc:
                logger.warning("worker lost Redis (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _free_slots(self) -> int:
        return self.max_jobs - self.job_counter if self.allow_pick_jobs else 0

    async def _idle_until_woken(self, timeout_s: float) -> list[bytes]:
        """Wait for a pushed job id (or the next full poll); returns the ids to start."""
        if timeout_s <= 0:
            return []
        if self._free_slots() <= 0:
            await asyncio.sleep(min(timeout_s, 0.05))  # full: wake-ups are for idle workers
            return []
        popped = await self.wake_redis.blpop([keys.WAKE], timeout=timeout_s)  # type: ignore[arg-type,misc]
        return [popped[1]] if popped else []

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Start what is startable among ``job_ids`` in one round trip.

        Replaces arq's loop, which spends a WATCH/MULTI transaction (four round trips) on
        every id, jobs running elsewhere included, with one script that takes each job
        that is due and not in progress, as arq's own check would.
        """
        slots = self._free_slots()
        candidates = [j for j in dict.fromkeys(job_ids) if j.decode() not in self.tasks]
        if slots <= 0 or not candidates:
            return
        in_progress_ms = int(self.in_progress_timeout_s * 1000)
        started = await self._start_script(
            keys=[self.queue_name],
            args=[int(time.time() * 1000), in_progress_ms, slots, *candidates],
        )
        for job_id, score in zip(started[::2], started[1::2], strict=True):
            await self.sem.acquire()
            self.job_counter += 1
            name = job_id.decode()
            task = self.loop.create_task(self.run_job(name, int(score)))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[name] = task

    async def close(self) -> None:
        await super().close()
        await self.wake_redis.aclose()


# KEYS: arq's queue. ARGV: now ms, in-progress ms, free slots, then arq job ids.
# Returns the (id, score) pairs it took: due, still queued, and not in progress.
_START = (
    """
local taken = {}
local slots = tonumber(ARGV[3])
for i = 4, #ARGV do
  if #taken >= slots * 2 then break end
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  local busy = redis.call('EXISTS', '"""
    + in_progress_key_prefix
    + """' .. id)
  if score and tonumber(score) <= tonumber(ARGV[1]) and busy == 0 then
    redis.call('PSETEX', '"""
    + in_progress_key_prefix
    + """' .. id, ARGV[2], '1')
    table.insert(taken, id)
    table.insert(taken, score)
  end
end
return taken
"""
)
