"""Starting a job: count it into the queue, open its stream, hand it to arq."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Literal

from arq.connections import ArqRedis

from shared import keys
from shared.cursors import new_job_id
from shared.event_log import EventLog
from shared.settings import Settings

from .errors import Unavailable
from .inputs import ChatRequest


class QueueFull(Unavailable):
    pass


async def enqueue(
    arq: ArqRedis,
    log: EventLog,
    settings: Settings,
    chat: ChatRequest,
    kind: Literal["get", "post"],
) -> str:
    """Enqueue one chat job and return its id; its ``queued`` event is written first."""
    job_id = new_job_id()
    now_ms = int(time.time() * 1000)
    async with arq.pipeline(transaction=False) as pipe:
        # Entries older than the queue timeout belong to jobs that can no longer start.
        pipe.zremrangebyscore(keys.PENDING, "-inf", now_ms - int(settings.queue_timeout_s * 1000))
        pipe.zcard(keys.PENDING)
        _, waiting = await pipe.execute()
    if waiting >= settings.max_queued_jobs:
        raise QueueFull(
            f"the queue is full ({waiting} jobs waiting, MAX_QUEUED_JOBS is"
            f" {settings.max_queued_jobs}); retry shortly"
        )
    await arq.zadd(keys.PENDING, {job_id: now_ms})
    ttl_s = int(settings.queue_timeout_s + settings.job_timeout_s) + settings.stream_retention_s
    await log.create(
        job_id,
        kind,
        position=waiting + 1,
        queue_timeout_s=settings.queue_timeout_s,
        ttl_s=ttl_s,
        watched_s=settings.disconnect_grace_s if kind == "get" else None,
    )
    request = {**asdict(chat), "kind": kind}
    await arq.enqueue_job(
        "chat", job_id, request, _job_id=job_id, _expires=settings.queue_timeout_s
    )
    return job_id
