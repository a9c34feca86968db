"""The worker's own start of jobs (pickup.py): a job's end never stops the worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from arq.worker import func

from shared.redis_conn import connect_arq
from worker.pickup import JOB_FUNCTION, PushWorker

from .harness import private_db, release_db


@pytest.fixture
def db_url(redis_url: str) -> Iterator[str]:
    url = private_db(redis_url)
    yield url
    release_db(url)


def _worker(db_url: str, job: Any) -> PushWorker:
    return PushWorker(
        wake_redis_url=db_url,
        functions=[func(job, name=JOB_FUNCTION)],
        redis_pool=connect_arq(db_url),
        job_timeout=0.5,
        handle_signals=False,
    )


async def _close(worker: PushWorker) -> None:
    # Not ``Worker.close``: it calls redis-py's deprecated ``close``, an error under pytest.
    await worker.pool.aclose()
    await worker.wake_redis.aclose()


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


def test_stopping_the_worker_still_cancels_a_running_job(db_url: str) -> None:
    async def waits(ctx: dict[str, Any], job_id: str) -> None:
        await asyncio.sleep(5)

    async def main() -> None:
        worker = _worker(db_url, waits)
        try:
            run = asyncio.create_task(worker._run("0" * 32, {"job_id": "0" * 32}))
            await asyncio.sleep(0.05)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
        finally:
            await _close(worker)

    asyncio.run(main())
