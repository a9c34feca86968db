"""What the worker relies on in arq's internals, checked on the version installed.

``worker/pickup.py`` (the one module that touches arq's private parts) runs claimed jobs
itself and keeps arq's bookkeeping as arq's own ``run_job`` would. An arq release that
renames or drops any of these fails here, naming what to look at, rather than in
production as a worker that takes no jobs or never stops.
"""

from __future__ import annotations

import inspect
from typing import Any

import arq
import pytest
from arq.connections import ArqRedis
from arq.worker import Worker, func

from worker.pickup import PushWorker

# Attributes the worker reads or writes on a running arq Worker.
RELIED_ON = [
    "main_task", "poll_delay_s", "pool", "on_startup", "ctx", "max_jobs", "job_counter",
    "allow_pick_jobs", "queue_name", "queue_read_limit", "tasks", "sem", "loop", "functions",
    "job_tasks", "jobs_complete", "jobs_failed", "job_timeout_s",
]  # fmt: skip


async def _chat(ctx: dict[str, Any], job_id: str) -> str:
    return job_id


def test_arq_is_the_pinned_version() -> None:
    assert arq.VERSION == "0.28.0", (
        f"arq {arq.VERSION} is installed; worker/pickup.py was written against 0.28.0:"
        " check the names in tests/test_arq_contract.py against the new release, then pin it"
    )


@pytest.mark.asyncio
async def test_a_worker_has_every_attribute_the_pickup_relies_on() -> None:
    worker = Worker(functions=[func(_chat, name="chat")], redis_pool=ArqRedis())
    missing = [name for name in RELIED_ON if not hasattr(worker, name)]
    assert not missing, f"arq's Worker no longer has {missing}: worker/pickup.py uses them"
    release = worker._release_sem_dec_counter_on_complete
    assert not inspect.signature(release).parameters, "arq changed how a job slot is released"
    assert inspect.iscoroutinefunction(Worker.main), "PushWorker.main replaces arq's main loop"
    assert worker.functions["chat"].coroutine is _chat
    assert set(worker.tasks) == set(worker.job_tasks) == set()
    await worker.pool.aclose()


def test_the_pushworker_overrides_only_what_arq_still_has() -> None:
    overridden = {
        name for name, value in vars(PushWorker).items()
        if callable(value) and not name.startswith("__") and hasattr(Worker, name)
    }  # fmt: skip
    assert {"main", "close"} <= overridden
