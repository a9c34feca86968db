"""The event log's scripts against a real Redis: ownership, fencing, ends, hand-backs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis

from shared import events as ev
from shared import keys
from shared.cursors import new_job_id
from shared.event_log import FINAL, MAX_REQUEUES, EventLog

from .harness import RedisServer, private_db, release_db

T = TypeVar("T")


@pytest.fixture
def db_url(redis_url: str) -> Iterator[str]:
    url = private_db(redis_url)
    yield url
    release_db(url)


def run(db_url: str, scenario: Callable[[EventLog], Awaitable[T]]) -> T:
    async def main() -> T:
        redis = Redis.from_url(db_url)
        try:
            return await scenario(EventLog(redis, retention_s=60, queue_timeout_s=5))
        finally:
            await redis.aclose()

    return asyncio.run(main())


async def new_job(log: EventLog) -> str:
    job_id = new_job_id()
    await log.create(job_id, "post", "", b"{}", ttl_s=600, watched_s=None, max_queued=100)
    return job_id


async def events(log: EventLog, job_id: str) -> list[dict[str, Any]]:
    entries = await log.redis.xrange(keys.events_key(job_id))
    return [ev.decode(fields[b"d"]) for _, fields in entries]


def test_one_owner_at_a_time_and_a_fenced_stale_attempt(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "first", 5000))[0] == "run"
        assert (await log.claim(job_id, job_id, "second", 5000))[0] == "busy"
        assert await log.append(job_id, "first", 1, [ev.Token("a")])
        assert not await log.append(job_id, "second", 1, [ev.Token("x")])
        assert await log.end(job_id, ev.CANCELLED)
        assert not await log.append(job_id, "first", 2, [ev.Token("b")])
        assert not await log.end(job_id, ev.CANCELLED)  # only one final event
        kinds = [e.get("lifecycle") or next(iter(e)) for e in await events(log, job_id)]
        assert kinds == ["queued", "started", "token", "error"]

    run(db_url, scenario)


def test_a_retried_batch_is_written_once(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        (await log.claim(job_id, job_id, "owner", 5000))[0]
        for _ in range(2):  # the reply to the first was "lost"
            assert await log.append(job_id, "owner", 1, [ev.Token("once")])
        assert await log.append(job_id, "owner", 2, [ev.Done()])
        texts = [e.get("token") for e in await events(log, job_id)]
        assert texts.count("once") == 1

    run(db_url, scenario)


def test_a_job_with_output_is_never_run_again(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        (await log.claim(job_id, job_id, "dead", 50))[0]
        await log.append(job_id, "dead", 1, [ev.Token("half")])
        await asyncio.sleep(0.1)  # its heartbeat lapses
        assert (await log.claim(job_id, job_id, "rerun", 5000))[0] == "lost"
        assert (await events(log, job_id))[-1] == {"error": ev.WORKER_LOST}

    run(db_url, scenario)


def test_the_watchdog_hands_back_a_job_without_output_then_gives_up(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        await log.redis.zadd(keys.WORKERS, {"alive": time.time() * 1000 + 60_000})
        job_id = await new_job(log)
        for attempt in range(1, MAX_REQUEUES + 2):
            assert (await log.claim(job_id, job_id, f"attempt-{attempt}", 20))[0] == "run"
            await asyncio.sleep(0.05)
            result = (await log.check_stalled([job_id]))[job_id]
            assert result == (2 if attempt <= MAX_REQUEUES else 4)
        assert (await events(log, job_id))[-1] == {"error": ev.TOO_MANY_ATTEMPTS}

    run(db_url, scenario)


def test_a_job_without_output_ends_at_once_when_no_worker_is_alive_to_rerun_it(
    db_url: str,
) -> None:
    """Its client hears within WORKER_LOST_TIMEOUT_S, not QUEUE_TIMEOUT_S later."""

    async def scenario(log: EventLog) -> None:
        await log.redis.zadd(keys.WORKERS, {"lapsed": time.time() * 1000 - 1})
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "dead", 20))[0] == "run"
        await asyncio.sleep(0.05)
        assert (await log.check_stalled([job_id]))[job_id] == 1
        assert (await events(log, job_id))[-1] == {"error": ev.WORKER_LOST}

    run(db_url, scenario)


def test_release_hands_back_only_without_output(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        (await log.claim(job_id, job_id, "a", 5000))[0]
        assert await log.release(job_id, "a") == 1
        assert (await log.claim(job_id, job_id, "b", 5000))[0] == "run"
        lifecycle = [e.get("lifecycle") for e in await events(log, job_id)]
        assert lifecycle.count("started") == 1  # the client sees one normal answer
        await log.append(job_id, "b", 1, [ev.Token("x")])
        assert await log.release(job_id, "b") == 0

    run(db_url, scenario)


def test_a_job_no_worker_started_in_time_never_runs(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        await log.redis.delete(keys.deadline_key(job_id))  # the queue timeout passed
        assert (await log.claim(job_id, job_id, "late", 5000))[0] == "expired"
        entries = await log.redis.xrange(keys.events_key(job_id))
        assert FINAL in entries[-1][1]
        assert ev.decode(entries[-1][1][b"d"]) == {"error": ev.NO_WORKER}

    run(db_url, scenario)


def test_the_final_event_starts_the_retention_clock(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        (await log.claim(job_id, job_id, "o", 5000))[0]
        assert await log.redis.ttl(keys.events_key(job_id)) > 60
        await log.append(job_id, "o", 1, [ev.Token("t"), ev.Done()])
        assert 0 < await log.redis.ttl(keys.events_key(job_id)) <= 60
        assert 0 < await log.redis.ttl(keys.meta_key(job_id)) <= 60

    run(db_url, scenario)


def test_appends_in_one_round_trip_survive_a_failing_call_and_a_script_flush(
    db_url: str,
) -> None:
    """Many jobs' batches share a round trip: a call Redis refuses fails alone (the others
    are written and the connection stays in step), and scripts a restarted Redis no longer
    has are loaded again without losing a batch."""

    async def scenario(log: EventLog) -> None:
        first, second = await new_job(log), await new_job(log)
        for job_id in (first, second):
            assert (await log.claim(job_id, job_id, "w", 5000))[0] == "run"
        # A batch "number" that is not a number makes that call's script fail in Redis.
        results = await log.append_many(
            [
                (first, "w", 1, [ev.Token("a")]),
                (second, "w", "x", [ev.Token("never")]),  # type: ignore[list-item]
                (second, "w", 1, [ev.Token("b")]),
            ]
        )
        assert results[0] is True and results[2] is True
        assert isinstance(results[1], Exception)
        await log.redis.script_flush()
        assert await log.append_many(
            [(first, "w", 2, [ev.Token("c")]), (second, "w", 2, [ev.Token("d")])]
        ) == [True, True]
        texts = [[e.get("token") for e in await events(log, j)] for j in (first, second)]
        assert texts == [[None, None, "a", "c"], [None, None, "b", "d"]]  # queued, started

    run(db_url, scenario)


def test_a_cancel_by_a_redis_user_without_channels_still_ends_the_job(
    own_redis: RedisServer,
) -> None:
    """Redis 7 gives new ACL users no pub/sub channels; the end's PUBLISH must not fail it."""

    async def main() -> None:
        admin = Redis.from_url(own_redis.url)
        await admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "+@all")
        app = Redis.from_url(own_redis.url.replace("redis://", "redis://app:pw@"))
        try:
            log = EventLog(app, retention_s=60, queue_timeout_s=5)
            job_id = await new_job(log)
            assert await log.end(job_id, ev.CANCELLED)
            assert (await events(log, job_id))[-1] == {"error": ev.CANCELLED}
        finally:
            await app.aclose()
            await admin.aclose()

    asyncio.run(main())
