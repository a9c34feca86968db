"""The worker's heartbeat: one script call per few hundred jobs renews the jobs this attempt
still owns and stops the others, each job getting its own verdict."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from redis.asyncio import Redis

from shared import keys
from shared.functions import Functions
from shared.redis_conn import connect
from worker import heartbeat as hb

from .harness import RedisServer


async def owns(redis: Redis, job_id: str, owner: str) -> None:
    """The attempt ``owner`` runs the job: its entry in the running index, as ``claim``
    writes it (its heartbeat renews only attempts found there)."""
    await redis.zadd(keys.RUNNING, {f"{job_id} {owner}": 1})


async def redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds * 1000 + micros // 1000)


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
            if owner not in (None, "-"):  # an ended job's attempt left the index
                await owns(redis, job_id, owner)
            if read:
                await redis.set(keys.watched_key(job_id), b"1")

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
        before = await redis_ms(redis)
        await beat.beat()
        await beat.check_readers()
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)

        assert stops == {job_id: c[3] for job_id, c in cases.items()}
        running = dict(await redis.zrange(keys.RUNNING, 0, -1, withscores=True))
        renewed = {f"{j} me".encode() for j, c in cases.items() if c[0] == "me"}
        assert set(running) == renewed | {b"taken-over other"}  # none added: by attempt
        assert all(running[member] >= before + 5000 for member in renewed)
        assert running[b"taken-over other"] == 1  # not this worker's attempt
        assert await redis.zscore(keys.WORKERS, "w1") >= before + 5000
        await redis.aclose()

    asyncio.run(scenario())


def test_beats_in_one_millisecond_still_find_every_attempt_present(db_url: str) -> None:
    """A beat asks which attempts are gone only when its renewal moved fewer entries than
    it named: a second beat within the same millisecond moves none, and must still find
    every attempt there (and one gone, gone)."""

    async def scenario() -> None:
        redis = connect(db_url)
        functions = Functions(redis)
        members = ["a me", "b me", "c me"]
        await redis.zadd(keys.RUNNING, {m: 1 for m in members[:2]})  # "c me" is gone
        calls = [([keys.RUNNING, keys.WORKERS], [5000, "w1", *members])] * 3
        replies = await functions.call_all("beat", calls)  # one round trip: mostly one ms
        for reply in replies:
            assert reply[1:] == [0, 0, 1]
        await redis.aclose()

    asyncio.run(scenario())


def test_an_idle_worker_beats_too(db_url: str) -> None:
    """The workers index says whether a dead worker's job can run again elsewhere."""

    async def scenario() -> None:
        redis = connect(db_url)
        await redis.zadd(keys.WORKERS, {"long-gone": 1})
        before = await redis_ms(redis)
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
        assert not beat._ended  # remembered once, not for ever
        other = asyncio.create_task(job("early"))
        for _ in range(5):
            await asyncio.sleep(0)
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

        handing_back, handed = asyncio.Event(), asyncio.Event()

        async def job() -> str:
            with beat.track("j", "me", watched=False) as running:
                try:
                    await asyncio.Event().wait()  # the answer
                except asyncio.CancelledError:
                    running.closing = True  # as chat_job does
                    handing_back.set()
                    await handed.wait()  # the hand-back, in flight
                    return "handed back"
            return "answered"

        task = asyncio.create_task(job())
        await asyncio.sleep(0)
        task.cancel()  # the worker stopping
        await handing_back.wait()
        beat.stop_ended("j")  # a DELETE heard meanwhile
        handed.set()
        try:
            return await asyncio.wait_for(task, 2)
        finally:
            await redis.aclose()

    assert asyncio.run(scenario()) == "handed back"


def test_an_attempt_unwinding_does_not_stop_the_beats_of_its_jobs_next_attempt(
    db_url: str,
) -> None:
    """A job handed back may run again on the same worker while its old attempt is still
    unwinding. Tracking by job id let the old attempt's exit stop the new one's beats: the
    new attempt's stream later ended with "worker lost", though it was healthy."""

    async def scenario() -> None:
        redis = connect(db_url)
        beat = hb.Heartbeat(redis, interval_s=60, alive_ms=5000, name="w")
        await owns(redis, "j", "new")
        old_done, new_done = asyncio.Event(), asyncio.Event()
        new_stop: list[str | None] = []

        async def attempt(owner: str, done: asyncio.Event) -> None:
            with beat.track("j", owner, watched=False) as running:
                await done.wait()
                if owner == "new":
                    new_stop.append(running.stop_reason)

        old = asyncio.create_task(attempt("old", old_done))
        new = asyncio.create_task(attempt("new", new_done))
        await asyncio.sleep(0)
        old_done.set()  # the old attempt finishes unwinding, the new one runs on
        await old
        await beat.beat()
        assert await redis.zscore(keys.RUNNING, "j new") > 1, "the new attempt was not renewed"
        assert await redis.zrange(keys.RUNNING, 0, -1) == [b"j new"]
        new_done.set()
        await new
        assert new_stop == [None]
        await redis.aclose()

    asyncio.run(scenario())


def test_an_attempt_that_exits_still_owning_its_job_stays_indexed_for_the_janitor(
    db_url: str,
) -> None:
    """Its final write failed (Redis refused it): the job is still its, and only the running
    index can lead a gateway to it once its heartbeat lapses. The beat used to drop the
    entries of attempts that had exited, and such a job never ended."""

    async def scenario() -> None:
        redis = connect(db_url)
        beat = hb.Heartbeat(redis, interval_s=60, alive_ms=5000, name="w")
        await owns(redis, "j", "me")
        with beat.track("j", "me", watched=False):
            await beat.beat()
        await beat.beat()  # the attempt has exited; its job is still its
        assert await redis.zrange(keys.RUNNING, 0, -1) == [b"j me"]
        await redis.aclose()

    asyncio.run(scenario())


async def calls(redis: Redis, command: str) -> int:
    """How many times this Redis has run ``command`` (a server of the test's own)."""
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def until_calls(redis: Redis, command: str, at_least: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while await calls(redis, command) < at_least:
        assert time.monotonic() < deadline, f"{command} not run {at_least} times in {within_s} s"
        await asyncio.sleep(0.01)


def running_job(beat: hb.Heartbeat, job_id: str, watched: bool) -> asyncio.Task[str | None]:
    """A job tracked by ``beat`` until it is stopped: its stop reason."""

    async def job() -> str | None:
        with beat.track(job_id, "me", watched) as running:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
            return running.stop_reason

    return asyncio.create_task(job())


def test_a_get_job_nobody_reads_stops_at_the_readers_pace_and_no_beat_comes_with_it(
    own_redis: RedisServer,
) -> None:
    """The beat runs every alive/3 (7 s): a GET job whose ``watched`` key is gone must stop
    within the readers' interval (a third of the grace), each asking costing one MGET and
    no beat; a POST job has no ``watched`` key and is never stopped for it."""
    readers_s = 0.2

    async def scenario() -> None:
        redis = connect(own_redis.url)
        for job_id in ("get", "post"):
            await owns(redis, job_id, "me")
        await redis.set(keys.watched_key("get"), b"1")
        beat = hb.Heartbeat(redis, interval_s=3600, alive_ms=60_000, name="w", readers_s=readers_s)
        get, post = running_job(beat, "get", True), running_job(beat, "post", False)
        beat.following(True)  # cancels followed: the beat keeps its interval; beat at once
        loop = asyncio.create_task(beat.run())
        await until_calls(redis, "mget", 3, 5)  # asked for thrice...
        assert await calls(redis, "fcall") == 2  # ...beaten at the start and on following()

        await redis.delete(keys.watched_key("get"))
        assert await asyncio.wait_for(get, readers_s + 1) == "unwatched"
        assert await calls(redis, "fcall") == 2, "asking for readers beat"
        assert not post.done()
        for task in (post, loop):
            task.cancel()
        assert await post is None
        await asyncio.gather(loop, return_exceptions=True)
        await redis.aclose()

    asyncio.run(scenario())


def test_beats_keep_their_interval_and_leave_the_readers_to_theirs(
    own_redis: RedisServer,
) -> None:
    """The converse: beats come every interval, and none asks whether a GET job is read
    (the beat used to, stopping it at the beat's pace)."""
    interval_s = 0.2

    async def scenario() -> None:
        redis = connect(own_redis.url)
        await owns(redis, "get", "me")
        await redis.set(keys.watched_key("get"), b"1")
        beat = hb.Heartbeat(redis, interval_s=interval_s, alive_ms=60_000, name="w", readers_s=3600)
        get = running_job(beat, "get", True)
        beat.following(True)
        loop = asyncio.create_task(beat.run())
        await until_calls(redis, "fcall", 2, 5)  # the start's two beats
        assert await calls(redis, "mget") == 1

        await redis.delete(keys.watched_key("get"))
        started, beats = time.monotonic(), await calls(redis, "fcall")
        await until_calls(redis, "fcall", beats + 3, 3 * interval_s + 2)
        assert time.monotonic() - started > 2 * interval_s - 0.05  # paced, not spinning
        renewed = await redis.zscore(keys.RUNNING, "get me")
        assert renewed >= await redis_ms(redis) + 59_000  # by the last beat
        assert not get.done() and await calls(redis, "mget") == 1
        for task in (get, loop):
            task.cancel()
        await asyncio.gather(get, loop, return_exceptions=True)
        await redis.aclose()

    asyncio.run(scenario())
