"""The gateway's look at its silent jobs (gateway/idle_check.py), over a real relay and a
real Redis: a job silent for a tick is swept, one silent for ``idle_check_after_s`` is
looked up, and after the relay's reads failed every job silent for a tick is.

The jobs here are unknown to Redis, as after it restarted empty: a look-up ends them as
lost at once, so whether one was looked up shows in whether it was ended."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from gateway.idle_check import IdleCheck
from gateway.metrics import GatewayMetrics
from gateway.relay import Relay
from shared import events as ev
from shared.cursors import START
from shared.event_log import EventLog
from shared.redis_conn import connect
from shared.settings import Settings
from shared.timing import Timing

from .harness import RedisServer

TICK_S = 0.05


class Watched:
    """A relay whose idle check runs, and what that check did: the jobs it swept (once per
    check), ended as lost (by when, loop time), and how many checks ran."""

    def __init__(self, relay: Relay, idle: IdleCheck, monkeypatch: pytest.MonkeyPatch) -> None:
        self.relay = relay
        self.swept: list[str] = []
        self.lost: dict[str, float] = {}
        self.checks = 0
        self._changed = asyncio.Event()
        sweep, end_lost, check = relay.sweep, relay.end_lost, idle.check
        loop_time = asyncio.get_running_loop().time

        def on_sweep(idle: list[str]) -> None:
            self.swept += idle
            self._changed.set()
            sweep(idle)

        def on_end_lost(job_id: str, why: str = ev.JOB_LOST) -> None:
            self.lost[job_id] = loop_time()
            self._changed.set()
            end_lost(job_id, why)

        async def on_check(*args: float) -> None:
            try:
                await check(*args)
            finally:
                self.checks += 1
                self._changed.set()

        monkeypatch.setattr(relay, "sweep", on_sweep)
        monkeypatch.setattr(relay, "end_lost", on_end_lost)
        monkeypatch.setattr(idle, "check", on_check)

    async def until(self, done: Callable[[], bool], within_s: float) -> None:
        async with asyncio.timeout(within_s):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    async def checks_pass(self, count: int) -> None:
        target = self.checks + count
        await self.until(lambda: self.checks >= target, count * TICK_S + 2)


@asynccontextmanager
async def idle_check(
    url: str, after_s: float, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Watched]:
    """The real ``Relay`` (its read loop not started: the test plays its failures) and
    ``IdleCheck``, a tick of ``TICK_S``."""
    settings = Settings()
    timing = dataclasses.replace(
        Timing.of(settings), watch_tick_s=TICK_S, idle_check_after_s=after_s
    )
    redis, blocking = connect(url), connect(url)
    log = EventLog(redis, timing)
    relay = Relay(redis, blocking, log, settings, GatewayMetrics(), anyio.Event())
    idle = IdleCheck(relay, log, GatewayMetrics(), timing)
    watched = Watched(relay, idle, monkeypatch)
    task = asyncio.create_task(idle.run())
    try:
        yield watched
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await relay.stop()
        await redis.aclose()
        await blocking.aclose()


def test_a_silent_job_is_swept_every_tick_but_looked_up_only_once_silent_past_the_wait(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its worker's heartbeat cannot have lapsed sooner (idle_check_after_s): looking up
    every job silent for a tick cost an MGET a second for each slow stream."""
    after_s = 1.0

    async def scenario() -> None:
        async with idle_check(db_url, after_s, monkeypatch) as watched:
            loop_time = asyncio.get_running_loop().time
            since = loop_time()
            reader = watched.relay.subscribe("unknown", START)
            await watched.until(
                lambda: watched.swept.count("unknown") >= 3 or bool(watched.lost), after_s
            )
            assert loop_time() - since < after_s
            assert not watched.lost, "looked up before its worker's heartbeat could lapse"

            await watched.until(lambda: "unknown" in watched.lost, after_s + 2)
            assert watched.lost["unknown"] - since >= after_s
            assert reader.ended and ev.JOB_LOST.encode() in reader.frames[-1]

    asyncio.run(scenario())


def test_after_the_relays_reads_failed_a_job_silent_for_a_tick_is_looked_up_at_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis may have restarted empty: its jobs' readers learn it within a tick or two, not
    after the wait. Once a check got through, the wait holds again."""

    async def scenario() -> None:
        async with idle_check(db_url, 3600, monkeypatch) as watched:
            watched.relay.subscribe("before", START)
            await watched.until(lambda: watched.swept.count("before") >= 2 or bool(watched.lost), 2)
            assert not watched.lost, "looked up before the wait"

            watched.relay._read_errors += 1
            await watched.until(lambda: "before" in watched.lost, 4 * TICK_S + 1)
            await watched.checks_pass(2)
            watched.relay.subscribe("after", START)
            await watched.until(
                lambda: watched.swept.count("after") >= 3 or "after" in watched.lost, 2
            )
            assert list(watched.lost) == ["before"], "the wait never held again"

    asyncio.run(scenario())


def test_while_redis_is_down_a_silent_job_stays_due_until_a_check_gets_through(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check that failed looked at nothing: the next ones look at every silent job
    still, until one reaches Redis (here back empty)."""

    async def scenario() -> None:
        async with idle_check(own_redis.url, 3600, monkeypatch) as watched:
            watched.relay.subscribe("cut-off", START)
            await watched.until(
                lambda: watched.swept.count("cut-off") >= 2 or bool(watched.lost), 2
            )
            assert not watched.lost, "looked up before the wait"

            own_redis.stop()
            watched.relay._read_errors += 1  # as the relay's read loop counts it
            await watched.checks_pass(3)  # each fails: Redis is down
            assert not watched.lost
            await asyncio.to_thread(own_redis.start)
            await watched.until(lambda: "cut-off" in watched.lost, 4 * TICK_S + 1)

    asyncio.run(scenario())


def test_a_job_streaming_until_the_relays_reads_failed_is_looked_up_once_silent_a_tick(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its events stop with the failure (Redis restarted empty in a blink): the first check
    after the failure finds it silent for less than a tick, and must not be the only one
    to skip the wait, else its readers learn the job is lost only after the wait."""

    async def scenario() -> None:
        async with idle_check(db_url, 3600, monkeypatch) as watched:
            await watched.checks_pass(1)
            await asyncio.sleep(TICK_S / 2)  # mid-tick: the next check is half a tick away
            watched.relay.subscribe("streaming", START)  # delivered its last event now
            watched.relay._read_errors += 1
            await watched.until(lambda: "streaming" in watched.lost, 4 * TICK_S + 1)

    asyncio.run(scenario())
