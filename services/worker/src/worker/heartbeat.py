"""Proves each running job alive, and stops the ones that should not go on.

Every ``HEARTBEAT`` interval one pipeline renews every running job's ``alive`` key (a
gateway that sees it lapse ends the job: its worker is gone; ``RUNNING`` indexes when each
lapses, so a gateway finds the job even when nobody reads it) and checks, per job, that this
attempt still owns it (a cancel or a takeover ends the stream from outside) and, for a
``GET /chat`` job, that some gateway still relays it. A job that fails a check has its task
cancelled, which closes its upstream request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys

logger = logging.getLogger(__name__)


@dataclass
class Running:
    owner: str
    watched: bool  # True for GET /chat jobs: cancelled when nobody reads them
    task: asyncio.Task[object]
    stop_reason: str | None = None  # "not-owner" or "unwatched" once the heartbeat stopped it


class Heartbeat:
    def __init__(self, redis: Redis, interval_s: float, alive_ms: int) -> None:
        self.redis = redis
        self.interval_s = interval_s
        self.alive_ms = alive_ms
        self.jobs: dict[str, Running] = {}
        self._finished: list[str] = []  # to leave the RUNNING index at the next beat

    @contextmanager
    def track(self, job_id: str, owner: str, watched: bool) -> Iterator[Running]:
        task = asyncio.current_task()
        assert task is not None
        running = Running(owner, watched, task)
        self.jobs[job_id] = running
        try:
            yield running
        finally:
            self.jobs.pop(job_id, None)
            self._finished.append(job_id)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.beat()
            except RedisError as exc:
                logger.warning("heartbeat failed: %s", exc)

    async def beat(self) -> None:
        jobs = list(self.jobs.items())
        if not jobs and not self._finished:
            return
        lapses_at = int(time.time() * 1000) + self.alive_ms
        finished, self._finished = self._finished, []
        async with self.redis.pipeline(transaction=False) as pipe:
            if finished:
                pipe.zrem(keys.RUNNING, *finished)
            for job_id, _ in jobs:
                pipe.hget(keys.meta_key(job_id), "owner")
                pipe.set(keys.alive_key(job_id), b"1", px=self.alive_ms)
                pipe.exists(keys.watched_key(job_id))
            if jobs:
                pipe.zadd(keys.RUNNING, {job_id: lapses_at for job_id, _ in jobs})
            results = await pipe.execute()
        results = results[1:] if finished else results
        for i, (_, running) in enumerate(jobs):
            owner, _, watched = results[3 * i : 3 * i + 3]
            if owner != running.owner.encode():
                self._stop(running, "not-owner")
            elif running.watched and not watched:
                self._stop(running, "unwatched")

    @staticmethod
    def _stop(running: Running, reason: str) -> None:
        if running.stop_reason is None:
            running.stop_reason = reason
            running.task.cancel()
