"""The worker's own start of jobs (pickup.py): a job's end never stops the worker, and a
request sent before its claim is closed when the claim says no."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import redis
from arq.worker import func

from shared import keys
from shared.shards import shard_specs
from worker.pickup import JOB_FUNCTION, PushWorker
from worker.shards import open_shards

from . import sse
from .harness import Stack, wait_until


def _worker(db_url: str, job: Any) -> PushWorker:
    return PushWorker(
        shards=open_shards(shard_specs(db_url), wake_timeout_s=5),
        functions=[func(job, name=JOB_FUNCTION)],
        job_timeout=0.5,
        handle_signals=False,
    )


async def _close(worker: PushWorker) -> None:
    # Not ``Worker.close``: it calls redis-py's deprecated ``close``, an error under pytest.
    await worker.pool.aclose()
    await worker.shards[0].wake.aclose()


def test_a_job_stopped_while_ending_or_past_its_timeout_leaves_the_worker_running(
    db_url: str,
) -> None:
    """A job whose own task is cancelled (its heartbeat stopping it as it ends) or that
    overruns the job timeout is over; ``_run`` must not raise, or arq's poll would end the
    worker."""

    async def cancels_itself(ctx: dict[str, Any], job_id: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(1)

    async def overruns(ctx: dict[str, Any], job_id: str) -> None:
        await asyncio.sleep(5)

    async def main() -> None:
        for job in (cancels_itself, overruns):
            worker = _worker(db_url, job)
            try:
                await worker._run("0" * 32, {"job_id": "0" * 32})
                assert worker.jobs_failed == 1
                assert not worker.job_tasks
            finally:
                await _close(worker)

    asyncio.run(main())


def test_stopping_the_worker_stops_a_running_job_which_then_ends_cleanly(db_url: str) -> None:
    """arq's shutdown cancels the run; the job sees the cancellation (to hand itself back),
    and the run returns, so arq's ``close`` does not fail on it."""
    seen: list[str] = []
    started = asyncio.Event()

    async def waits(ctx: dict[str, Any], job_id: str) -> None:
        started.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        worker = _worker(db_url, waits)
        try:
            run = asyncio.create_task(worker._run("0" * 32, {"job_id": "0" * 32}))
            await asyncio.wait_for(started.wait(), 5)  # the job runs
            run.cancel()
            await run
            assert seen == ["cancelled"]
            assert not worker.job_tasks
        finally:
            await _close(worker)

    asyncio.run(main())


def test_a_request_sent_before_a_refused_claim_is_closed_and_writes_nothing(
    stack: Stack, client: httpx.Client
) -> None:
    """A wake-up for a job that has already ended: the worker may call the LLM before its
    claim returns, but it must then close that request and publish nothing."""
    done = sse.read(client, stack.gateway.url + "/chat", params={"prompt": "[long 3]"})
    job_id = done.events[0]["job_id"]
    r = redis.Redis.from_url(stack.redis_url)
    try:
        before = r.xlen(keys.events_key(job_id))
        request = orjson.dumps({"prompt": "[long 500] [delay 0.02]", "kind": "post"})
        wake_up = f"{job_id}.feedbeef {int(time.time() * 1000)} ".encode() + request
        r.lpush(keys.WAKE, wake_up)
        wait_until(lambda: r.llen(keys.WAKE) == 0, 5, "the worker to pop the wake-up")
        # Its claim said no, and the job is over (its early request abandoned).
        said = f"job {job_id} not run: final"
        wait_until(lambda: any(said in w.log() for w in stack.workers), 5, "the refusal")
        wait_until(lambda: stack.llm_stats()["open_streams"] == 0, 5, "no open LLM stream")
        # Nothing comes later either: a fixed gap, as that is what this proves.
        time.sleep(0.3)
        assert r.xlen(keys.events_key(job_id)) == before
        assert stack.llm_stats()["open_streams"] == 0
    finally:
        r.close()
    # The worker is fine and takes new work.
    again = sse.read(client, stack.gateway.url + "/chat", params={"prompt": "[long 5]"})
    assert sse.is_done(again.events[-1])
