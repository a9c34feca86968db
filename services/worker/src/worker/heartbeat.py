"""Proves each running job alive, and stops the ones that should not go on.

Every heartbeat interval one round trip (the library's ``beat``) renews every running
attempt's entry in the running index, scored by when it lapses (a gateway that sees it
lapse ends the job: its worker is gone; the janitor finds it there even when nobody reads
it), and tells, per attempt, whether it still owns its job (a cancel or a takeover ends the
stream from outside, and removes the entry). Three times per disconnect grace, one ``MGET``
asks whether some gateway still relays each ``GET /chat`` job (its ``watched`` key): apart,
the beat need not run at the grace's pace. An attempt that fails a check has its task
cancelled, which closes its upstream request.

Attempts are tracked by their owner token, not their job: a job handed back may run again
on this worker while its old attempt is still unwinding, and each has its own verdict.

The checks run in Redis, one command per thousand attempts (two when one is gone): a
command per job and beat was most of Redis's and the worker's CPU once they held thousands
of slow streams. Each beat also reads Redis's clock (``RedisClock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.functions import Functions
from shared.keys import Keys
from shared.redis_clock import RedisClock
from shared.redis_conn import mget_many
from shared.timing import CANCEL_FALLBACK_S, ENDED_MEMORY_S, STALLED_S

logger = logging.getLogger(__name__)


@dataclass
class Running:
    job_id: str
    owner: str  # the attempt's token: the job's meta hash names it while it owns the job
    watched: bool  # True for GET /chat jobs: cancelled when nobody reads them
    task: asyncio.Task[object]
    stop_reason: str | None = None  # "not-owner" or "unwatched" once the heartbeat stopped it
    # Set once the job has begun to end (hand-back, final event, session unlock): a stop
    # verdict then changes nothing, for a cancel landing mid-way would leave that half done
    # (a hand-back applied in Redis but unseen here unlocked the session of a re-queued job).
    closing: bool = False


BEAT_BATCH = 1000  # attempts per script call: Redis serves other clients between calls


class Heartbeat:
    def __init__(
        self,
        redis: Redis,
        interval_s: float,
        alive_ms: int,
        name: str,
        clock: RedisClock | None = None,
        names: Keys | None = None,
        readers_s: float | None = None,
    ) -> None:
        self.redis = redis
        self.keys = names or Keys()  # the shard's key names
        self.name = name  # in the workers index, beaten even while idle
        self.interval_s = interval_s
        self.readers_s = readers_s or interval_s  # how often GET jobs' readers are asked for
        self.alive_ms = alive_ms
        self.clock = clock or RedisClock()
        self._functions = Functions(redis)
        self.attempts: dict[str, Running] = {}  # by running index member, "<job id> <owner>"
        self.last_tick = time.monotonic()  # when the loop last began a beat: its liveness
        # Jobs ended from outside before they were tracked here (a cancel between the claim
        # and ``track``), by when the note is forgotten.
        self._ended: OrderedDict[str, float] = OrderedDict()
        self._wake = asyncio.Event()
        self._following = False  # until the cancel subscription is confirmed

    def running(self) -> int:
        """Attempts running here now."""
        return len(self.attempts)

    @contextmanager
    def track(self, job_id: str, owner: str, watched: bool) -> Iterator[Running]:
        task = asyncio.current_task()
        assert task is not None
        running = Running(job_id, owner, watched, task)
        member = f"{job_id} {owner}"
        self.attempts[member] = running
        if self._ended.pop(job_id, None) is not None:
            self._stop(running, "not-owner")
        try:
            yield running
        finally:
            del self.attempts[member]

    async def run(self) -> None:
        """Beat at once (a new worker counts as alive from its start), then every interval;
        after a failed beat, every second until one succeeds, so that a Redis outage ends
        with this worker and its jobs proven alive again as soon as it can be. While
        cancels are not followed (``following``), every half second at most: the beat's
        ownership check then carries them, within the contract's second. The readers of GET
        jobs are asked for on their own pace, likewise retried."""
        next_beat = next_readers = time.monotonic()
        while True:
            now = self.last_tick = time.monotonic()
            if now >= next_beat:
                next_beat = now + await self._attempt(self.beat, self._next_beat_s())
            if now >= next_readers:
                next_readers = now + await self._attempt(self.check_readers, self.readers_s)
            if await self._sleep(min(next_beat, next_readers) - time.monotonic()):
                next_beat = 0.0  # woken by ``following``: beat now

    @staticmethod
    async def _attempt(step: Callable[[], Awaitable[None]], interval_s: float) -> float:
        """Run one step; the seconds until it is due again (a second at most if it failed)."""
        try:
            await step()
        except Exception as exc:  # never stop beating: the jobs' heartbeats would lapse
            if isinstance(exc, RedisError):
                logger.warning("heartbeat failed: %s", exc)
            else:
                logger.exception("heartbeat failed")
            return min(1.0, interval_s)
        return interval_s

    def ticking(self) -> bool:
        """Whether the event loop still runs the heartbeat (a Redis outage does not stop it:
        it retries every second), for the worker's ``/healthz``."""
        return time.monotonic() - self.last_tick < STALLED_S

    def _next_beat_s(self) -> float:
        return self.interval_s if self._following else min(self.interval_s, CANCEL_FALLBACK_S)

    def following(self, on: bool) -> None:
        """Whether cancels reach this worker by themselves (worker/ended_jobs.py). Either
        way, beat now: after a gap, cancels published meanwhile were missed, and the
        beat's ownership check catches them; a gap starting needs the fast beats at once."""
        self._following = on
        self._wake.set()

    async def _sleep(self, seconds: float) -> bool:
        """Whether woken before ``seconds`` passed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(seconds, 0))
        woken = self._wake.is_set()
        self._wake.clear()
        return woken

    async def beat(self) -> None:
        attempts = list(self.attempts.values())
        calls = []
        function_keys = [self.keys.running, self.keys.workers]
        for start in range(0, max(len(attempts), 1), BEAT_BATCH):
            args: list[str | int] = [self.alive_ms, self.name]
            args += [f"{r.job_id} {r.owner}" for r in attempts[start : start + BEAT_BATCH]]
            calls.append((function_keys, args))
        sent_at = self.clock.local()
        replies = await self._functions.call_all("beat", calls)
        self.clock.observe(replies[0][0], sent_at, self.clock.local())
        verdicts = [verdict for reply in replies for verdict in reply[1:]]
        for running, verdict in zip(attempts, verdicts, strict=True):
            if verdict == 1:
                self._stop(running, "not-owner")

    async def check_readers(self) -> None:
        """Stop the GET jobs that no gateway relays: their ``watched`` keys have lapsed."""
        watched = [r for r in self.attempts.values() if r.watched and r.stop_reason is None]
        if not watched:
            return
        marks = await mget_many(self.redis, [self.keys.watched(r.job_id) for r in watched])
        for running, mark in zip(watched, marks, strict=True):
            if mark is None:
                self._stop(running, "unwatched")

    def stop_ended(self, job_id: str) -> None:
        """The job was ended from outside (cancelled): stop it now if it runs here, or as
        soon as it is tracked, if that comes within a minute (its claim may be on its way)."""
        stopped = [r for r in self.attempts.values() if r.job_id == job_id]
        for running in stopped:
            self._stop(running, "not-owner")
        if stopped:
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
