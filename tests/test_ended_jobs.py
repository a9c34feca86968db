"""A job ended from outside (DELETE) is stopped by its worker at once, not at its next
heartbeat, and still after Redis restarts."""

from __future__ import annotations

import asyncio
import contextlib
import time

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from shared import keys
from shared.redis_conn import connect
from shared.tasks import cancel_and_wait
from worker.ended_jobs import follow_ended_jobs
from worker.heartbeat import Heartbeat

from .harness import RedisServer, wait_until_async


async def subscribed(client: Redis) -> None:
    deadline = time.monotonic() + 5
    while True:
        with contextlib.suppress(RedisConnectionError):  # the test's own pooled connection
            if (await client.pubsub_numsub(keys.ENDED))[0][1] == 1:
                return
        assert time.monotonic() < deadline, "the worker does not follow ended jobs"
        await asyncio.sleep(0.05)


async def tracked_job(beat: Heartbeat, job_id: str) -> str | None:
    """A job ``beat`` tracks, running until stopped: why it was (None: from outside)."""
    with beat.track(job_id, "me", watched=False) as running:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return running.stop_reason
    return None


def test_an_ended_job_stops_at_once_across_a_redis_restart(own_redis: RedisServer) -> None:
    async def main() -> None:
        client = connect(own_redis.url, socket_timeout=5)
        beat = Heartbeat(client, interval_s=3600, alive_ms=5000, name="w")
        follower = asyncio.create_task(follow_ended_jobs(client, beat))
        try:
            for job_id in ("before-restart", "after-restart"):
                task = asyncio.create_task(tracked_job(beat, job_id))
                other = asyncio.create_task(tracked_job(beat, f"{job_id}-untouched"))
                await subscribed(client)
                await client.publish(keys.ENDED, job_id)
                assert await asyncio.wait_for(task, 2) == "not-owner"
                assert not other.done()  # only the job named
                other.cancel()
                own_redis.stop()
                own_redis.start()
        finally:
            await cancel_and_wait([follower])
            await client.aclose()

    asyncio.run(main())


def test_a_cancel_published_before_the_worker_follows_is_caught_once_it_does(
    own_redis: RedisServer,
) -> None:
    """A cancel published while nobody listens (a subscription lost and being made again)
    is lost to pub/sub; the beat that each confirmed subscription asks for finds the job no
    longer this attempt's."""

    async def main() -> None:
        client = connect(own_redis.url, socket_timeout=5)
        beat = Heartbeat(client, interval_s=3600, alive_ms=5000, name="w")
        beat.following(True)  # as before the loss: no half-second beats to catch it
        beating = asyncio.create_task(beat.run())
        await client.zadd(keys.RUNNING, {"missed me": 1})  # as claim writes it
        task = asyncio.create_task(tracked_job(beat, "missed"))

        # The first beat has run and renewed the job: the cancel below comes after the beats
        # a start brings, so only the subscription's beat can catch it.
        async def renewed() -> bool:
            return (await client.zscore(keys.RUNNING, "missed me") or 0) > 1

        await wait_until_async(renewed, 5, "a beat to renew the job")
        assert not task.done()
        await client.zrem(keys.RUNNING, "missed me")  # ended, as the end script does
        await client.publish(keys.ENDED, "missed")  # to nobody
        follower = asyncio.create_task(follow_ended_jobs(client, beat))
        try:
            assert await asyncio.wait_for(task, 2) == "not-owner"
        finally:
            await cancel_and_wait([follower, beating, task])
            await client.aclose()

    asyncio.run(main())


def test_a_worker_that_cannot_follow_cancels_beats_them_within_the_second(
    own_redis: RedisServer,
) -> None:
    """A Redis user without the channel (Redis 7's default for a new ACL user) cannot
    subscribe: the heartbeat, however long its interval, then beats twice a second and
    stops an ended job within the contract's second."""

    async def main() -> None:
        admin = Redis.from_url(own_redis.url)
        await admin.execute_command("ACL", "SETUSER", "nochan", "on", ">pw", "~*", "+@all")
        client = connect(own_redis.url.replace("redis://", "redis://nochan:pw@"), socket_timeout=5)
        beat = Heartbeat(client, interval_s=3600, alive_ms=5000, name="w")
        beating = asyncio.create_task(beat.run())
        follower = asyncio.create_task(follow_ended_jobs(client, beat))
        await admin.zadd(keys.RUNNING, {"ended me": 1})  # as claim writes it
        task = asyncio.create_task(tracked_job(beat, "ended"))
        try:
            # Beats have come and gone (two renewals of the job, its score in the running
            # index moved on): the job goes on.
            scores: set[float] = set()

            async def renewed_twice() -> bool:
                score = await admin.zscore(keys.RUNNING, "ended me")
                if score is not None:
                    scores.add(score)
                return len(scores) >= 2

            await wait_until_async(renewed_twice, 5, "two beats to renew the job")
            assert not task.done()
            await admin.zrem(keys.RUNNING, "ended me")  # as the end script does
            ended_at = time.monotonic()
            assert await asyncio.wait_for(task, 2) == "not-owner"
            assert time.monotonic() - ended_at < 1.0
        finally:
            await cancel_and_wait([follower, beating, task])
            await client.aclose()
            await admin.aclose()

    asyncio.run(main())
