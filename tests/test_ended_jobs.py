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

from .harness import RedisServer


async def subscribed(client: Redis) -> None:
    deadline = time.monotonic() + 5
    while True:
        with contextlib.suppress(RedisConnectionError):  # the test's own pooled connection
            if (await client.pubsub_numsub(keys.ENDED))[0][1] == 1:
                return
        assert time.monotonic() < deadline, "the worker does not follow ended jobs"
        await asyncio.sleep(0.05)


def test_an_ended_job_stops_at_once_across_a_redis_restart(own_redis: RedisServer) -> None:
    async def main() -> None:
        client = connect(own_redis.url, socket_timeout=5)
        beat = Heartbeat(client, interval_s=3600, alive_ms=5000, name="w")
        follower = asyncio.create_task(follow_ended_jobs(client, beat))
        reasons: dict[str, str | None] = {}

        async def job(job_id: str) -> None:
            with beat.track(job_id, "me", watched=False) as running:
                try:
                    await asyncio.sleep(30)
                finally:
                    reasons[job_id] = running.stop_reason

        try:
            for job_id in ("before-restart", "after-restart"):
                task = asyncio.create_task(job(job_id))
                other = asyncio.create_task(job(f"{job_id}-untouched"))
                await subscribed(client)
                await client.publish(keys.ENDED, job_id)
                await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 2)
                assert reasons[job_id] == "not-owner"
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
    """A cancel published while nobody listens is lost to pub/sub; the beat that each
    confirmed subscription asks for finds the job no longer this attempt's."""

    async def main() -> None:
        client = connect(own_redis.url, socket_timeout=5)
        beat = Heartbeat(client, interval_s=3600, alive_ms=5000, name="w")
        stopped = asyncio.Event()

        async def job() -> None:
            with beat.track("missed", "me", watched=False) as running:
                try:
                    await asyncio.sleep(30)
                finally:
                    assert running.stop_reason == "not-owner"
                    stopped.set()

        await client.hset(keys.meta_key("missed"), mapping={"owner": "me"})
        beating = asyncio.create_task(beat.run())
        task = asyncio.create_task(job())
        await asyncio.sleep(0.2)  # the first beat has run and renewed the job
        assert not task.done()
        await client.hset(keys.meta_key("missed"), "owner", "-")  # ended, as the end script does
        await client.publish(keys.ENDED, "missed")  # to nobody
        follower = asyncio.create_task(follow_ended_jobs(client, beat))
        try:
            await asyncio.wait_for(stopped.wait(), 2)
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
        stopped = asyncio.Event()

        async def job() -> None:
            with beat.track("ended", "me", watched=False) as running:
                try:
                    await asyncio.sleep(30)
                finally:
                    assert running.stop_reason == "not-owner"
                    stopped.set()

        await admin.hset(keys.meta_key("ended"), mapping={"owner": "me"})
        task = asyncio.create_task(job())
        try:
            await asyncio.sleep(1.2)  # beats have come and gone: the job goes on
            assert not task.done()
            await admin.hset(keys.meta_key("ended"), "owner", "-")  # as the end script does
            ended_at = time.monotonic()
            await asyncio.wait_for(stopped.wait(), 2)
            assert time.monotonic() - ended_at < 1.0
        finally:
            await cancel_and_wait([follower, beating, task])
            await client.aclose()
            await admin.aclose()

    asyncio.run(main())
