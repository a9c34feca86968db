"""Proves each running job alive, and stops the ones that should not go on.

Every ``HEARTBEAT`` interval one round trip renews every running job's ``alive`` key (a
gateway that sees it lapse ends the job: its worker is gone; ``RUNNING`` indexes when each
lapses, so a gateway finds the job even when nobody reads it) and checks, per job, that this
attempt still owns it (a cancel or a takeover ends the stream from outside) and, for a
``GET /chat`` job, that some gateway still relays it. A job that fails a check has its task
cancelled, which closes its upstream request.

The checks run in a script, a few hundred jobs per call: as separate commands they cost
the worker ~40 µs of CPU per job and beat, most of its CPU once it holds a thousand slow
streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys
from shared.lua import Scripts

logger = logging.getLogger(__name__)


@dataclass
class Running:
    owner: str
    watched: bool  # True for GET /chat jobs: cancelled when nobody reads them
    task: asyncio.Task[object]
    stop_reason: str | None = None  # "not-owner" or "unwatched" once the heartbeat stopped it
    # Set once the job has begun to end (hand-back, final event, session unlock): a stop
    # verdict then changes nothing, for a cancel landing mid-way would leave that half done
    # (a hand-back applied in Redis but unseen here unlocked the session of a re-queued job).
    closing: bool = False


# KEYS: the running index, the workers index, then per job its meta hash, alive key and
# watched key. ARGV: alive ms, when the heartbeat lapses (ms), this worker's name, how many
# ended jobs leave the index, their ids, then per job its id, this attempt's owner token and
# '1' for a GET job (it needs a reader). Per job: 0 go on, 1 no longer this attempt's
# (nothing renewed), 2 nobody relays it. The workers index is scored on Redis's clock (the
# check that reads it runs there too); workers gone for a day leave it.
BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 86400000)
local ended = tonumber(ARGV[4])
for i = 5, 4 + ended do redis.call('ZREM', KEYS[1], ARGV[i]) end
local a = 4 + ended
local out = {}
for i = 0, (#KEYS - 2) / 3 - 1 do
  local meta, alive, watched = KEYS[3 + 3 * i], KEYS[4 + 3 * i], KEYS[5 + 3 * i]
  if redis.call('HGET', meta, 'owner') ~= ARGV[a + 2 + 3 * i] then
    out[i + 1] = 1
  else
    redis.call('SET', alive, '1', 'PX', ARGV[1])
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[a + 1 + 3 * i])
    out[i + 1] = (ARGV[a + 3 + 3 * i] == '1' and redis.call('EXISTS', watched) == 0) and 2 or 0
  end
end
return out
"""
BEAT_BATCH = 500  # jobs per script call: Redis serves other clients between calls
CANCEL_FALLBACK_S = 0.5  # the beat's interval while cancels are not followed
ENDED_MEMORY_S = 60.0  # how long a cancel of a job not (yet) running here is remembered


class Heartbeat:
    def __init__(self, redis: Redis, interval_s: float, alive_ms: int, name: str) -> None:
        self.redis = redis
        self.name = name  # in the workers index, beaten even while idle
        self.interval_s = interval_s
        self.alive_ms = alive_ms
        self._scripts = Scripts(redis)
        self.jobs: dict[str, Running] = {}
        self._finished: list[str] = []  # to leave the RUNNING index at the next beat
        # Jobs ended from outside before they were tracked here (a cancel between the claim
        # and ``track``), by when the note is forgotten.
        self._ended: OrderedDict[str, float] = OrderedDict()
        self._wake = asyncio.Event()
        self._following = False  # until the cancel subscription is confirmed

    @contextmanager
    def track(self, job_id: str, owner: str, watched: bool) -> Iterator[Running]:
        task = asyncio.current_task()
        assert task is not None
        running = Running(owner, watched, task)
        self.jobs[job_id] = running
        if self._ended.pop(job_id, None) is not None:
            self._stop(running, "not-owner")
        try:
            yield running
        finally:
            self.jobs.pop(job_id, None)
            self._finished.append(job_id)

    async def run(self) -> None:
        """Beat at once (a new worker counts as alive from its start), then every interval;
        after a failed beat, every second until one succeeds, so that a Redis outage ends
        with this worker and its jobs proven alive again as soon as it can be. While
        cancels are not followed (``following``), every half second at most: the beat's
        ownership check then carries them, within the contract's second."""
        while True:
            try:
                await self.beat()
            except Exception as exc:  # never stop beating: the jobs' alive keys would lapse
                if isinstance(exc, RedisError):
                    logger.warning("heartbeat failed: %s", exc)
                else:
                    logger.exception("heartbeat failed")
                await self._sleep(min(1.0, self._next_beat_s()))
            else:
                await self._sleep(self._next_beat_s())

    def _next_beat_s(self) -> float:
        return self.interval_s if self._following else min(self.interval_s, CANCEL_FALLBACK_S)

    def following(self, on: bool) -> None:
        """Whether cancels reach this worker by themselves (worker/ended_jobs.py). Either
        way, beat now: after a gap, cancels published meanwhile were missed, and the
        beat's ownership check catches them; a gap starting needs the fast beats at once."""
        self._following = on
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def beat(self) -> None:
        jobs = list(self.jobs.items())
        lapses_at = int(time.time() * 1000) + self.alive_ms
        finished, self._finished = self._finished, []
        calls = []
        for start in range(0, max(len(jobs), 1), BEAT_BATCH):
            script_keys = [keys.RUNNING, keys.WORKERS]
            ended = finished if start == 0 else []
            args: list[str | int] = [self.alive_ms, lapses_at, self.name, len(ended), *ended]
            for job_id, running in jobs[start : start + BEAT_BATCH]:
                script_keys += [
                    keys.meta_key(job_id),
                    keys.alive_key(job_id),
                    keys.watched_key(job_id),
                ]
                args += [job_id, running.owner, "1" if running.watched else "0"]
            calls.append((script_keys, args))
        verdicts = []
        for batch in await self._scripts.run_all(BEAT, calls):
            verdicts += batch
        for (_, running), verdict in zip(jobs, verdicts, strict=True):
            if verdict == 1:
                self._stop(running, "not-owner")
            elif verdict == 2:
                self._stop(running, "unwatched")

    def stop_ended(self, job_id: str) -> None:
        """The job was ended from outside (cancelled): stop it now if it runs here, or as
        soon as it is tracked, if that comes within a minute (its claim may be on its way)."""
        running = self.jobs.get(job_id)
        if running is not None:
            self._stop(running, "not-owner")
            return
        now = time.monotonic()
        while self._ended and next(iter(self._ended.values())) < now:
            self._ended.popitem(last=False)  # the oldest first: every note lives as long
        self._ended.pop(job_id, None)
        self._ended[job_id] = now + ENDED_MEMORY_S

    @staticmethod
    def _stop(running: Running, reason: str) -> None:
        if running.stop_reason is None and not running.closing:
            running.stop_reason = reason
            running.task.cancel()
