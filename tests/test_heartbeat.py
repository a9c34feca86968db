"""The worker's heartbeat: one script call per few hundred jobs renews the jobs this attempt
still owns and stops the others, each job getting its own verdict."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from shared import keys
from shared.redis_conn import connect
from worker import heartbeat as hb

from .harness import private_db, release_db


@pytest.fixture
def db_url(redis_url: str) -> Iterator[str]:
    url = private_db(redis_url)
    yield url
    release_db(url)


def test_each_job_gets_its_own_verdict_across_script_batches(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hb, "BEAT_BATCH", 2)  # 7 jobs: 4 script calls in one round trip

    async def scenario() -> None:
        redis = connect(db_url)
        beat = hb.Heartbeat(redis, interval_s=60, alive_ms=5000, name="w1")
        # job: (owner in Redis, GET job?, has a reader?) -> expected stop reason
        cases = {
            "ours": ("me", False, False, None),
            "ours-get-read": ("me", True, True, None),
            "ours-get-unread": ("me", True, False, "unwatched"),
            "taken-over": ("other", False, False, "not-owner"),
            "ended": ("-", True, True, "not-owner"),
            "gone": (None, False, False, "not-owner"),
            "ours-too": ("me", False, False, None),
        }
        for job_id, (owner, _, read, _) in cases.items():
            if owner is not None:
                await redis.hset(keys.meta_key(job_id), "owner", owner)  # type: ignore[misc]
            if read:
                await redis.set(keys.watched_key(job_id), b"1")
        await redis.zadd(keys.RUNNING, {"finished-before": 1})
        beat._finished.append("finished-before")

        stops: dict[str, str | None] = {}
        release = asyncio.Event()

        async def job(job_id: str, watched: bool) -> None:
            with beat.track(job_id, "me", watched) as running:
                try:
                    await release.wait()
                finally:
                    stops[job_id] = running.stop_reason

        tasks = [asyncio.create_task(job(j, c[1])) for j, c in cases.items()]
        await asyncio.sleep(0)
        before = int(time.time() * 1000)
        await beat.beat()
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)

        assert stops == {job_id: c[3] for job_id, c in cases.items()}
        running = dict(await redis.zrange(keys.RUNNING, 0, -1, withscores=True))
        renewed = {j for j, c in cases.items() if c[0] == "me"}
        assert {k.decode() for k in running} == renewed  # finished-before left the index
        assert all(score >= before + 5000 for score in running.values())
        for job_id in cases:
            ttl = await redis.pttl(keys.alive_key(job_id))
            assert (0 < ttl <= 5000) if job_id in renewed else ttl == -2, job_id
        assert await redis.zscore(keys.WORKERS, "w1") >= before + 5000
        await redis.aclose()

    asyncio.run(scenario())


def test_an_idle_worker_beats_too(db_url: str) -> None:
    """The workers index says whether a dead worker's job can run again elsewhere."""

    async def scenario() -> None:
        redis = connect(db_url)
        await redis.zadd(keys.WORKERS, {"long-gone": 1})
        before = int(time.time() * 1000)
        await hb.Heartbeat(redis, interval_s=60, alive_ms=5000, name="idle").beat()
        workers = dict(await redis.zrange(keys.WORKERS, 0, -1, withscores=True))
        assert list(workers) == [b"idle"]  # a day past its lapse, a worker leaves the index
        assert workers[b"idle"] >= before + 5000
        await redis.aclose()

    asyncio.run(scenario())


def test_a_cancel_heard_before_the_job_is_tracked_stops_it_once_it_is(db_url: str) -> None:
    """DELETE may land between a job's claim (its ``started`` event) and ``track``."""

    async def scenario() -> None:
        redis = connect(db_url)
        beat = hb.Heartbeat(redis, interval_s=60, alive_ms=5000, name="w")
        beat.stop_ended("early")
        reasons: dict[str, str | None] = {}

        async def job(job_id: str) -> None:
            with beat.track(job_id, "me", watched=False) as running:
                try:
                    await asyncio.sleep(5)
                finally:
                    reasons[job_id] = running.stop_reason

        await asyncio.wait_for(asyncio.gather(job("early"), return_exceptions=True), 1)
        assert reasons == {"early": "not-owner"}
        other = asyncio.create_task(job("early"))  # remembered once, not for ever
        await asyncio.sleep(0.05)
        assert not other.done()
        other.cancel()
        await redis.aclose()

    asyncio.run(scenario())


def test_a_stop_verdict_does_not_interrupt_a_job_that_has_begun_to_end(db_url: str) -> None:
    """A worker stopping cancels a job, which hands itself back; a DELETE (or a verdict of
    the beat) landing while that hand-back is in flight must not cut it short: the job would
    unlock its session though Redis had already queued it again (two answers, one session)."""

    async def scenario() -> str:
        redis = connect(db_url)
        beat = hb.Heartbeat(redis, interval_s=60, alive_ms=5000, name="w")

        async def job() -> str:
            with beat.track("j", "me", watched=False) as running:
                try:
                    await asyncio.sleep(5)  # the answer
                except asyncio.CancelledError:
                    running.closing = True  # as chat_job does
                    await asyncio.sleep(0.2)  # the hand-back, in flight
                    return "handed back"
            return "answered"

        task = asyncio.create_task(job())
        await asyncio.sleep(0.05)
        task.cancel()  # the worker stopping
        await asyncio.sleep(0.05)
        beat.stop_ended("j")  # a DELETE heard meanwhile
        try:
            return await asyncio.wait_for(task, 2)
        finally:
            await redis.aclose()

    assert asyncio.run(scenario()) == "handed back"
