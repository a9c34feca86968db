"""One clock: a process's estimate of Redis's clock holds whatever its own clock says, so
hosts whose clocks disagree still agree on a job's age (a wake-up's freshness, the
fallback poll's "waited one second")."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from shared.redis_clock import RedisClock
from shared.timing import EARLY_WITHIN_S
from worker.heartbeat import Heartbeat
from worker.pickup import _parse_wake_up

HOUR_S = 3600.0


def test_a_host_an_hour_off_reads_redis_time_after_one_beat(redis_url: str) -> None:
    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        clock = RedisClock(local=lambda: time.time() - HOUR_S)  # this host is an hour behind
        await Heartbeat(redis, interval_s=60, alive_ms=5000, name="skewed", clock=clock).beat()
        seconds, micros = await redis.time()
        redis_ms = seconds * 1000 + micros // 1000
        assert abs(clock.now_ms() - redis_ms) < 50
        await redis.zrem("sg:workers", "skewed")
        await redis.aclose()

    asyncio.run(scenario())


def test_a_wake_ups_freshness_is_judged_on_redis_time() -> None:
    redis_now_ms = 1_800_000_000_000
    enqueued = redis_now_ms - 200  # 0.2 s ago, by Redis
    wake_up = f"job1 {enqueued} {{}}".encode()
    assert _parse_wake_up(wake_up, redis_now_ms) == ("job1", b"{}")
    stale = redis_now_ms + int(EARLY_WITHIN_S * 1000) + 1
    assert _parse_wake_up(wake_up, stale) == ("job1", None)


def test_the_estimate_moves_with_the_local_clock_between_measurements() -> None:
    now = [1000.0]
    clock = RedisClock(local=lambda: now[0])
    clock.observe(5_000_000, sent_at=1000.0, received_at=1000.002)  # Redis read halfway
    assert clock.now_ms() == 5_000_000 - 1
    now[0] += 2.5
    assert clock.now_ms() == 5_002_499


def test_an_estimate_for_a_deadline_is_never_ahead_of_redis() -> None:
    """A slow answer (Redis read its clock at once, then the answer took 4 s to come)
    would put the middle of the round trip 2 s ahead; taken as read on arrival, the
    estimate is behind by the round trip at most, never ahead."""
    now = [100.0]
    clock = RedisClock(local=lambda: now[0])
    redis_ms = 1_000_000  # Redis's clock when the request was sent, at local 100.0
    now[0] = 104.0  # the answer arrives 4 s later
    clock.observe_at_most(redis_ms, now[0])
    assert clock.measured and clock.now_ms() == redis_ms  # Redis is at +4 s: 4 s behind
