"""The event log's functions against a real Redis: ownership, fencing, ends, hand-backs,
the janitor's sweep, and the library's own loading."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared import events as ev
from shared import functions, keys
from shared.cursors import new_job_id
from shared.event_log import FINAL, Closing, EventLog, Turn, UsageRecord
from shared.redis_clock import RedisClock
from shared.sessions import SessionStore
from shared.settings import Settings
from shared.timing import MAX_REQUEUES, Timing

from .harness import RedisServer

T = TypeVar("T")


TIMING = Timing.of(Settings(stream_retention_s=60, queue_timeout_s=5))


def run(db_url: str, scenario: Callable[[EventLog], Awaitable[T]]) -> T:
    async def main() -> T:
        redis = Redis.from_url(db_url)
        try:
            return await scenario(EventLog(redis, TIMING))
        finally:
            await redis.aclose()

    return asyncio.run(main())


async def new_job(log: EventLog) -> str:
    job_id = new_job_id()
    await log.create(job_id, "post", "", b"{}", watched=False, max_queued=100)
    return job_id


async def redis_ms(log: EventLog) -> int:
    seconds, micros = await log.redis.time()
    return int(seconds * 1000 + micros // 1000)


async def lapse(log: EventLog, job_id: str, owner: str) -> None:
    """The attempt's heartbeat lapsed: its running index entry is behind Redis's clock."""
    await log.redis.zadd(keys.RUNNING, {f"{job_id} {owner}": 1}, xx=True)


async def events(log: EventLog, job_id: str) -> list[dict[str, Any]]:
    entries = await log.redis.xrange(keys.events_key(job_id))
    return [ev.decode(fields[b"d"]) for _, fields in entries]


def test_one_owner_at_a_time_and_a_fenced_stale_attempt(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "first"))[0] == "run"
        assert (await log.claim(job_id, job_id, "second"))[0] == "busy"
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
        (await log.claim(job_id, job_id, "owner"))[0]
        for _ in range(2):  # the reply to the first was "lost"
            assert await log.append(job_id, "owner", 1, [ev.Token("once")])
        assert await log.append(job_id, "owner", 2, [ev.Done()])
        texts = [e.get("token") for e in await events(log, job_id)]
        assert texts.count("once") == 1

    run(db_url, scenario)


def test_a_claim_takes_the_streams_last_entry_from_the_stream(db_url: str) -> None:
    """The doorbell tells which entry a write follows from the meta hash's ``last``: a job
    claimed again takes it from the stream itself, which an attempt of an older library
    may have written without keeping ``last``."""

    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "old"))[0] == "run"
        unkept = await log.redis.xadd(keys.events_key(job_id), {"d": b'{"lifecycle":"x"}'})
        assert await log.release(job_id, "old") == 1
        assert (await log.claim(job_id, job_id, "new"))[0] == "run"
        assert await log.redis.hget(keys.meta_key(job_id), "last") == unkept

    run(db_url, scenario)


def test_a_job_with_output_is_never_run_again(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        (await log.claim(job_id, job_id, "dead"))[0]
        await log.append(job_id, "dead", 1, [ev.Token("half")])
        await lapse(log, job_id, "dead")  # its heartbeat lapsed
        assert (await log.claim(job_id, job_id, "rerun"))[0] == "lost"
        assert (await events(log, job_id))[-1] == {"error": ev.WORKER_LOST}

    run(db_url, scenario)


def test_the_watchdog_hands_back_a_job_without_output_then_gives_up(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        await log.redis.zadd(keys.WORKERS, {"alive": await redis_ms(log) + 60_000})
        job_id = await new_job(log)
        for attempt in range(1, MAX_REQUEUES + 2):
            assert (await log.claim(job_id, job_id, f"attempt-{attempt}"))[0] == "run"
            await lapse(log, job_id, f"attempt-{attempt}")  # its heartbeat lapsed
            result = (await log.check_stalled([job_id]))[job_id]
            assert result == (2 if attempt <= MAX_REQUEUES else 4)
        assert (await events(log, job_id))[-1] == {"error": ev.TOO_MANY_ATTEMPTS}

    run(db_url, scenario)


def test_a_job_without_output_ends_at_once_when_no_worker_is_alive_to_rerun_it(
    db_url: str,
) -> None:
    """Its client hears within WORKER_LOST_TIMEOUT_S, not QUEUE_TIMEOUT_S later."""

    async def scenario(log: EventLog) -> None:
        await log.redis.zadd(keys.WORKERS, {"lapsed": await redis_ms(log) - 1})
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "dead"))[0] == "run"
        await lapse(log, job_id, "dead")  # its heartbeat lapsed
        assert (await log.check_stalled([job_id]))[job_id] == 1
        assert (await events(log, job_id))[-1] == {"error": ev.WORKER_LOST}

    run(db_url, scenario)


def test_release_hands_back_only_without_output(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        (await log.claim(job_id, job_id, "a"))[0]
        assert await log.release(job_id, "a") == 1
        assert (await log.claim(job_id, job_id, "b"))[0] == "run"
        lifecycle = [e.get("lifecycle") for e in await events(log, job_id)]
        assert lifecycle.count("started") == 1  # the client sees one normal answer
        await log.append(job_id, "b", 1, [ev.Token("x")])
        assert await log.release(job_id, "b") == 0

    run(db_url, scenario)


def test_a_job_no_worker_started_in_time_never_runs(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        await log.redis.delete(keys.deadline_key(job_id))  # the queue timeout passed
        assert (await log.claim(job_id, job_id, "late"))[0] == "expired"
        entries = await log.redis.xrange(keys.events_key(job_id))
        assert FINAL in entries[-1][1]
        assert ev.decode(entries[-1][1][b"d"]) == {"error": ev.NO_WORKER}

    run(db_url, scenario)


def test_a_create_redis_runs_past_its_callers_wait_writes_nothing(db_url: str) -> None:
    """A Redis that hung and woke with a create unread runs it after its gateway gave up
    (and answered its client otherwise): past the time it was to be answered by, it writes
    nothing. Its answer sets the caller's clock right, so the next one is judged on time."""

    async def scenario(log: EventLog) -> None:
        behind = RedisClock(local=lambda: time.time() - 100)  # as if sent 100 s ago
        behind.measured = True  # (a clock not read yet reads Redis's TIME first)
        job_id = new_job_id()
        assert await log.create(job_id, "post", "", b"{}", False, 100, behind, 4.0) == 0
        assert await log.redis.exists(keys.meta_key(job_id), keys.events_key(job_id)) == 0
        assert (
            await log.redis.zcard(keys.QUEUE_NAME) == 0 and await log.redis.zcard(keys.PENDING) == 0
        )
        assert await log.create(job_id, "post", "", b"{}", False, 100, behind, 4.0) == 1

    run(db_url, scenario)


def test_a_final_write_holding_an_event_json_cannot_carry_still_ends_the_job(
    db_url: str,
) -> None:
    """An event with no JSON form fails its write before Redis sees it. When that write
    held the final event too, the job ends all the same, with an error written alone:
    without a final event it hung until its heartbeat lapsed, and ran again."""
    from worker.publisher import UNPUBLISHABLE, Batcher

    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "w:1"))[0] == "run"
        batcher = Batcher(log, redis_patience_s=1)
        publisher = batcher.publisher(job_id, "w:1")
        publisher.emit(ev.Token("fine "))
        await asyncio.sleep(0.1)  # written on its own
        publisher.emit(ev.ToolCallStarted("call_1", {1, 2}))  # type: ignore[arg-type]
        assert await publisher.close(ev.Done("stop"))  # in the same write
        await batcher.stop()
        assert (await events(log, job_id))[2:] == [{"token": "fine "}, {"error": UNPUBLISHABLE}]

    run(db_url, scenario)


def test_the_final_event_starts_the_retention_clock(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        (await log.claim(job_id, job_id, "o"))[0]
        assert await log.redis.ttl(keys.events_key(job_id)) > 60
        await log.append(job_id, "o", 1, [ev.Token("t"), ev.Done()])
        assert 0 < await log.redis.ttl(keys.events_key(job_id)) <= 60
        assert 0 < await log.redis.ttl(keys.meta_key(job_id)) <= 60

    run(db_url, scenario)


def test_appends_in_one_round_trip_survive_a_failing_call_and_a_function_flush(
    db_url: str,
) -> None:
    """Many jobs' batches share a round trip: a call Redis refuses fails alone (the others
    are written and the connection stays in step), and a library a restarted Redis no
    longer has is loaded again without losing a batch."""

    async def scenario(log: EventLog) -> None:
        first, second = await new_job(log), await new_job(log)
        for job_id in (first, second):
            assert (await log.claim(job_id, job_id, "w"))[0] == "run"
        # A batch "number" that is not a number makes that call's script fail in Redis.
        results = await log.append_many(
            [
                (first, "w", 1, [ev.Token("a")], None),
                (second, "w", "x", [ev.Token("never")], None),  # type: ignore[list-item]
                (second, "w", 1, [ev.Token("b")], None),
            ]
        )
        assert results[0] is True and results[2] is True
        assert isinstance(results[1], Exception)
        await log.redis.function_flush()
        assert await log.append_many(
            [(first, "w", 2, [ev.Token("c")], None), (second, "w", 2, [ev.Token("d")], None)]
        ) == [True, True]
        texts = [[e.get("token") for e in await events(log, j)] for j in (first, second)]
        assert texts == [[None, None, "a", "c"], [None, None, "b", "d"]]  # queued, started

    run(db_url, scenario)


def test_writes_ring_the_doorbell_only_while_a_gateway_keeps_it(db_url: str) -> None:
    """The doorbell costs Redis a write per token: with no gateway following it (no
    ``sg:activity``) nothing rings; once one has made it, every write to a stream rings,
    the final event's batch included."""

    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "w"))[0] == "run"
        assert await log.append(job_id, "w", 1, [ev.Token("a")])
        assert not await log.redis.exists(keys.ACTIVITY)
        await log.redis.xadd(keys.ACTIVITY, {"k": b""})  # as relay.py opens it
        assert await log.append(job_id, "w", 2, [ev.Token("b")])
        assert await log.append(job_id, "w", 3, [ev.Token("c"), ev.Done()])
        rung = [fields[b"k"] for _, fields in await log.redis.xrange(keys.ACTIVITY)]
        assert rung == [b"", keys.events_key(job_id).encode(), keys.events_key(job_id).encode()]
        assert [e.get("token") for e in await events(log, job_id)][2:] == ["a", "b", "c", None]

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
            log = EventLog(app, TIMING)
            job_id = await new_job(log)
            assert await log.end(job_id, ev.CANCELLED)
            assert (await events(log, job_id))[-1] == {"error": ev.CANCELLED}
        finally:
            await app.aclose()
            await admin.aclose()

    asyncio.run(main())


def test_a_session_turn_is_written_with_the_final_event_or_not_at_all(db_url: str) -> None:
    """Memory never holds a turn whose answer the client saw fail: a job cancelled just
    before its `done` (its append is fenced) leaves the session as it was."""

    async def scenario(log: EventLog) -> None:
        turns = keys.session_key("s")
        turn = Turn(turns, b'{"prompt": "p", "answer": "a"}', max_turns=2, retention_s=600)
        kept = await new_job(log)
        assert (await log.claim(kept, kept, "w"))[0] == "run"
        closing = Closing(turn)
        assert await log.append(kept, "w", 1, [ev.Token("a")], closing=closing)  # no final yet
        assert await log.redis.llen(turns) == 0
        assert await log.append(kept, "w", 2, [ev.Done()], closing=Closing(turn))
        assert await log.redis.lrange(turns, 0, -1) == [turn.entry]
        assert 0 < await log.redis.ttl(turns) <= 600

        cancelled = await new_job(log)
        assert (await log.claim(cancelled, cancelled, "w"))[0] == "run"
        assert await log.end(cancelled, ev.CANCELLED)
        batch = [ev.Token("b"), ev.Done()]
        assert not await log.append(cancelled, "w", 1, batch, closing=closing)
        assert await log.redis.llen(turns) == 1

    run(db_url, scenario)


def test_each_claim_and_hand_back_gives_the_job_keys_time_for_what_may_still_come(
    db_url: str,
) -> None:
    """TTLs used to be fixed at creation: hand-backs and a long run could outlive them."""

    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        meta, events_key = keys.meta_key(job_id), keys.events_key(job_id)
        for key in (meta, events_key):
            await log.redis.expire(key, 5)  # as if most of its life had passed waiting
        assert (await log.claim(job_id, job_id, "a"))[0] == "run"
        for key in (meta, events_key):
            assert await log.redis.ttl(key) > TIMING.run_ttl_s - 5
            await log.redis.expire(key, 5)
        assert await log.release(job_id, "a") == 1
        for key in (meta, events_key):
            assert await log.redis.ttl(key) > TIMING.queued_ttl_s - 5

    run(db_url, scenario)


def test_a_hand_back_keeps_the_running_index_to_the_attempt_that_runs(db_url: str) -> None:
    """The index holds attempts: the old one's entry goes when the job changes hands."""

    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "old"))[0] == "run"
        assert await log.release(job_id, "old") == 1
        (queued_as,) = [m.decode() for m in await log.redis.zrange(keys.PENDING, 0, -1)]
        assert (await log.claim(job_id, queued_as, "new"))[0] == "run"
        assert await log.redis.zrange(keys.RUNNING, 0, -1) == [f"{job_id} new".encode()]
        assert await log.redis.zcard(keys.PENDING) == 0

    run(db_url, scenario)


def test_new_chats_leave_a_late_job_to_the_janitor_which_ends_it(db_url: str) -> None:
    """New chats used to prune the waiting set, racing the sweep that ends late jobs: a
    POST job that timed out in the queue could miss its final event (and keep its session
    locked). Now only a check removes an entry, in the step that ends the job."""

    async def scenario(log: EventLog) -> None:
        late = await new_job(log)
        long_ago = await redis_ms(log) - TIMING.queue_timeout_ms - 1000
        await log.redis.zadd(keys.PENDING, {late: long_ago})  # waited past the timeout
        await log.redis.delete(keys.deadline_key(late))
        for _ in range(3):
            await new_job(log)  # each used to prune the late entry
        assert await log.redis.zscore(keys.PENDING, late) is not None
        lapsed, due = await log.due(100)
        assert (lapsed, due) == ([], [late.encode()])
        assert (await log.check_stalled([late], [(b"", late.encode())]))[late] == 3
        assert (await events(log, late))[-1] == {"error": ev.NO_WORKER}
        assert await log.redis.zscore(keys.PENDING, late) is None

    run(db_url, scenario)


def test_the_janitor_leaves_an_entry_whose_job_still_needs_it(db_url: str) -> None:
    """A lapsed entry whose attempt beat since the janitor listed it stays;
    one of an attempt that no longer runs the job goes, without touching the job."""

    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "now"))[0] == "run"
        current, stale = f"{job_id} now".encode(), f"{job_id} before".encode()
        await log.redis.zadd(keys.RUNNING, {current: 1, stale: 1})  # both lapsed
        lapsed, _ = await log.due(100)
        assert sorted(lapsed) == sorted([current, stale])
        await log.redis.zadd(keys.RUNNING, {current: await redis_ms(log) + 60_000})  # a beat
        results = await log.check_stalled([job_id, job_id], [(current, b""), (stale, b"")])
        assert results == {job_id: 0}
        assert await log.redis.zrange(keys.RUNNING, 0, -1) == [current]

    run(db_url, scenario)


def test_the_library_is_reloaded_when_redis_holds_another_text_of_it(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        other = functions.library_code().replace("return waiting + 1", "return 1000")
        await log.redis.function_load(other, replace=True)  # an edited library, same version
        fresh = EventLog(log.redis, TIMING)
        await fresh.functions.ensure_loaded()
        listed = await log.redis.function_list(library=functions.LIBRARY, withcode=True)
        assert listed[0][listed[0].index(b"library_code") + 1] == functions.library_code().encode()
        assert (await fresh.claim(job_id, job_id, "w"))[0] == "run"

    run(db_url, scenario)


def test_usage_is_counted_with_the_final_event_once_and_unknown_apart(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        counted = UsageRecord("abc", "m|odel", ev.Usage(10, 5, 15))
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "w"))[0] == "run"
        for _ in range(2):  # the reply to the first was lost: the retry counts nothing
            assert await log.append(job_id, "w", 1, [ev.Done()], closing=Closing(usage=counted))
        unknown = await new_job(log)
        assert (await log.claim(unknown, unknown, "w"))[0] == "run"
        closing = Closing(usage=UsageRecord("abc", "m|odel", None))
        assert await log.append(unknown, "w", 1, [ev.Error("x")], closing=closing)
        day = await redis_ms(log) // 86_400_000
        fields = await log.redis.hgetall(keys.usage_key("abc"))
        assert {k.decode(): int(v) for k, v in fields.items()} == {
            f"{day}|m|odel|jobs": 1,
            f"{day}|m|odel|prompt_tokens": 10,
            f"{day}|m|odel|completion_tokens": 5,
            f"{day}|m|odel|total_tokens": 15,
            f"{day}|m|odel|unknown_jobs": 1,
        }
        assert await log.redis.ttl(keys.usage_key("abc")) > 300 * 86400
        assert not await log.redis.exists(keys.usage_key("other"))

    run(db_url, scenario)


def test_the_library_text_is_the_one_its_version_names() -> None:
    """Two texts under one version would replace each other in Redis at every start."""
    digest = hashlib.sha256(functions.SOURCE.read_bytes()).hexdigest()
    assert digest == functions.SOURCE_SHA256, (
        "streamgate.lua changed: bump functions.VERSION (processes of the last release call"
        f" their own functions by name) and set SOURCE_SHA256 = {digest!r}"
    )


def test_a_session_is_not_freed_by_an_attempt_whose_job_runs_again(db_url: str) -> None:
    """A worker back from a long pause finds its job handed back and queued again: its
    clean-up must not free the session for a second answer while that run is to come."""

    async def scenario(log: EventLog) -> None:
        await log.redis.zadd(keys.WORKERS, {"alive": await redis_ms(log) + 60_000})
        sessions = SessionStore(log, 10, 10_000, 600, lock_ttl_s=600)
        job_id = await new_job(log)
        assert await sessions.lock("s", job_id) is None
        assert (await log.claim(job_id, job_id, "paused"))[0] == "run"
        await lapse(log, job_id, "paused")  # its heartbeat lapsed
        assert (await log.check_stalled([job_id]))[job_id] == 2  # queued again
        await sessions.unlock("s", job_id)  # the paused attempt's clean-up
        assert await sessions.holder("s") == job_id
        assert await log.end(job_id, ev.CANCELLED)
        await sessions.unlock("s", job_id)
        assert await sessions.holder("s") is None

    run(db_url, scenario)


def test_a_final_batch_with_bad_usage_figures_writes_nothing(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        turns = keys.session_key("s")
        turn = Turn(turns, b'{"prompt": "p", "answer": "a"}', max_turns=2, retention_s=600)
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "w"))[0] == "run"
        # Past the Python checks (a caller of its own): the function refuses it itself.
        bad = UsageRecord("abc", "m", ev.Usage("12.5", 3, "15.5"))  # type: ignore[arg-type]
        with pytest.raises(ResponseError, match="whole numbers"):
            await log.append(job_id, "w", 1, [ev.Token("a"), ev.Done()], Closing(turn, bad))
        assert await log.redis.llen(turns) == 0
        assert not await log.redis.exists(keys.usage_key("abc"))
        assert not await log.is_over(job_id)
        good = UsageRecord("abc", "m", ev.Usage(12, 3, 15))
        assert await log.append(job_id, "w", 1, [ev.Token("a"), ev.Done()], Closing(turn, good))
        assert await log.redis.llen(turns) == 1 and await log.is_over(job_id)

    run(db_url, scenario)


def test_a_job_cancelled_mid_answer_counts_once_as_unknown(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "w"))[0] == "run"
        unknown = UsageRecord("abc", "m", None)
        assert not await log.count_stopped(job_id, unknown)  # still running: not yet
        assert await log.end(job_id, ev.CANCELLED)
        assert await log.count_stopped(job_id, unknown)
        assert not await log.count_stopped(job_id, UsageRecord("abc", "m", ev.Usage(1, 1, 2)))
        fields = await log.redis.hgetall(keys.usage_key("abc"))
        day = await redis_ms(log) // 86_400_000
        assert {k.decode(): int(v) for k, v in fields.items()} == {f"{day}|m|unknown_jobs": 1}

    run(db_url, scenario)


def test_a_job_cancelled_between_requests_counts_their_tokens(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "w"))[0] == "run"
        assert await log.end(job_id, ev.CANCELLED)
        bad = UsageRecord("abc", "m", ev.Usage("1.5", 1, 2))  # type: ignore[arg-type]
        with pytest.raises(ResponseError, match="whole numbers"):
            await log.count_stopped(job_id, bad)
        assert await log.count_stopped(job_id, UsageRecord("abc", "m", ev.Usage(40, 2, 42)))
        fields = await log.redis.hgetall(keys.usage_key("abc"))
        day = await redis_ms(log) // 86_400_000
        assert {k.decode(): int(v) for k, v in fields.items()} == {
            f"{day}|m|jobs": 1,
            f"{day}|m|prompt_tokens": 40,
            f"{day}|m|completion_tokens": 2,
            f"{day}|m|total_tokens": 42,
        }

    run(db_url, scenario)


def test_usage_too_large_for_redis_is_refused_before_any_write(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        job_id = await new_job(log)
        assert (await log.claim(job_id, job_id, "w"))[0] == "run"
        huge = UsageRecord("abc", "m", ev.Usage(2**63, 1, 2**63 + 1))
        with pytest.raises(ResponseError, match="whole numbers"):
            await log.append(job_id, "w", 1, [ev.Token("a"), ev.Done()], Closing(usage=huge))
        assert not await log.redis.hexists(keys.meta_key(job_id), "counted")
        assert [e.get("token") for e in await events(log, job_id)] == [None, None]

    run(db_url, scenario)


def test_a_batch_that_cannot_be_sent_fails_its_job_alone(db_url: str) -> None:
    async def scenario(log: EventLog) -> None:
        bad, good = await new_job(log), await new_job(log)
        for job_id in (bad, good):
            assert (await log.claim(job_id, job_id, "w"))[0] == "run"
        unencodable = ev.ToolResult("c1", "t", {"x": {1, 2}}, "out")  # a set is not JSON
        results = await log.append_many(
            [(bad, "w", 1, [unencodable], None), (good, "w", 1, [ev.Token("ok")], None)]
        )
        assert isinstance(results[0], TypeError) and results[1] is True
        assert [e.get("token") for e in await events(log, good)][-1] == "ok"

    run(db_url, scenario)


def test_many_jobs_tokens_go_in_one_call_each_job_fenced_and_failing_alone(
    db_url: str,
) -> None:
    """Batches without a final event of several jobs share one function call (Redis pays a
    call once); one job no longer owned and one whose key Redis cannot use are answered
    alone, and a final batch beside them is written whole."""

    async def scenario(log: EventLog) -> None:
        jobs = [await new_job(log) for _ in range(5)]
        for job_id in jobs:
            assert (await log.claim(job_id, job_id, "w"))[0] == "run"
        stolen, broken, ending = jobs[1], jobs[2], jobs[4]
        assert (await log.end(stolen, ev.CANCELLED)) is True
        await log.redis.delete(keys.events_key(broken))
        await log.redis.set(keys.events_key(broken), b"not a stream")
        marker = await log.redis.xadd(keys.ACTIVITY, {"k": ""})  # a gateway follows it
        calls_before = (await log.redis.info("commandstats"))["cmdstat_fcall"]["calls"]
        results = await log.append_many(
            [
                (jobs[0], "w", 1, [ev.Token("a")], None),
                (stolen, "w", 1, [ev.Token("x")], None),
                (broken, "w", 1, [ev.Token("y")], None),
                (jobs[3], "w", 1, [ev.Token("b"), ev.ToolCallStarted("c1", "t")], None),
                (ending, "w", 1, [ev.Token("z"), ev.Done()], None),
            ]
        )
        calls = (await log.redis.info("commandstats"))["cmdstat_fcall"]["calls"] - calls_before
        assert calls == 2  # the four token batches together, the final batch alone
        assert results[0] is True and results[1] is False and results[3] is True
        assert isinstance(results[2], Exception) and "WRONGTYPE" in str(results[2])
        assert results[4] is True
        assert [e.get("token") for e in await events(log, jobs[0])][-1] == "a"
        assert list((await events(log, jobs[3]))[-1]) == ["tool_call"]
        assert [next(iter(e)) for e in await events(log, ending)][-2:] == ["token", "lifecycle"]
        assert await log.is_over(ending)
        after_marker = "(" + marker.decode()
        # EVAL keeps the raw fields: redis-py's XRANGE makes a dict, losing repeated 'k's
        entries = await log.redis.eval(
            "return redis.call('XRANGE', KEYS[1], ARGV[1], '+')", 1, keys.ACTIVITY, after_marker
        )
        rings = [flat for _, flat in entries]

        async def group(job_id: str) -> list[bytes]:
            """What a write after the claim rings: the stream, its entry before the write
            (``started``), then each entry written, as the stream holds it."""
            _queued, started, *written = await log.redis.xrange(keys.events_key(job_id))
            flat = [b"k", keys.events_key(job_id).encode(), b"p", started[0]]
            for entry_id, fields in written:
                flat += [b"i", entry_id, b"d", fields[b"d"]]
                flat += [b"f", b"1"] if FINAL in fields else []
            return flat

        shared = await group(jobs[0]) + await group(jobs[3])
        assert rings == [shared, await group(ending)], (
            "the shared call rings once, with only the streams it wrote and what it wrote"
        )

    run(db_url, scenario)


def test_a_batch_that_failed_midway_is_written_by_its_retry_not_acknowledged(
    db_url: str,
) -> None:
    """The batch number is recorded after the events: a retry of a batch Redis refused
    writes it (alone or in a shared call), rather than taking it for written."""

    async def scenario(log: EventLog) -> None:
        jobs = [await new_job(log) for _ in range(3)]
        for job_id in jobs:
            assert (await log.claim(job_id, job_id, "w"))[0] == "run"
        lone, shared, other = jobs
        for job_id in (lone, shared):
            await log.redis.rename(keys.events_key(job_id), "kept")
            await log.redis.set(keys.events_key(job_id), b"not a stream")
            first = await log.append_many(
                [(job_id, "w", 1, [ev.Token("a")], None)]
                + ([(other, "w", 1, [ev.Token("o")], None)] if job_id == shared else [])
            )
            assert isinstance(first[0], Exception)
            await log.redis.rename("kept", keys.events_key(job_id))
            again = await log.append_many(
                [(job_id, "w", 1, [ev.Token("a")], None)]
                + ([(other, "w", 2, [ev.Token("p")], None)] if job_id == shared else [])
            )
            assert again[0] is True
            assert [e.get("token") for e in await events(log, job_id)][-1] == "a"
        assert [e.get("token") for e in await events(log, other)][-2:] == ["o", "p"]

    run(db_url, scenario)


def test_a_job_sent_twice_keeps_its_order_and_a_malformed_shared_call_writes_nothing(
    db_url: str,
) -> None:
    async def scenario(log: EventLog) -> None:
        ending, other = await new_job(log), await new_job(log)
        for job_id in (ending, other):
            assert (await log.claim(job_id, job_id, "w"))[0] == "run"
        results = await log.append_many(
            [
                (ending, "w", 1, [ev.Token("last"), ev.Done()], None),
                (ending, "w", 2, [ev.Token("after")], None),  # nothing follows a final
                (other, "w", 1, [ev.Token("o")], None),
            ]
        )
        assert results == [True, False, True]
        assert await log.is_over(ending)
        assert [e.get("token") for e in await events(log, ending)][-1] is None  # done last
        length = await log.redis.xlen(keys.events_key(other))
        call_keys = [keys.ACTIVITY, keys.meta_key(other), keys.events_key(other)]
        for args in (["w", 2, 0, 2, "x"], ["w", 2, 0, "many", "x"], ["w", 2, 0]):
            with pytest.raises(ResponseError, match="do not match"):
                await log.functions.call("append_each", call_keys, args)
        assert await log.redis.xlen(keys.events_key(other)) == length

    run(db_url, scenario)
