"""Putting a job on arq's queue, for the gateway (a new chat, a requeue) and the worker (a
job it hands back at shutdown).

This writes what ``ArqRedis.enqueue_job`` writes (the serialized job, its place in the
queue), without its WATCH/MULTI round trips: those guard against a reused job id, and ours
are random or numbered. Only the job id travels through arq (and its logs); the request
waits in the job's meta hash.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio.client import Pipeline

from . import keys


@dataclass(frozen=True)
class ArqJob:
    """One arq job for a chat: the Redis writes that put it on the queue."""

    arq_id: str
    key: str  # arq's job key, holding the serialized call
    payload: bytes
    enqueued_ms: int


def arq_job(job_id: str, arq_id: str | None = None) -> ArqJob:
    """The arq job that runs ``job_id``. A job handed back gets a fresh arq id
    (``arq_id=None``): arq keeps a stopped attempt's id "in progress" for a long while."""
    arq_id = arq_id or f"{job_id}.{secrets.token_hex(4)}"
    now_ms = int(time.time() * 1000)
    payload = serialize_job("chat", (job_id,), {}, None, now_ms)
    return ArqJob(arq_id, job_key_prefix + arq_id, payload, now_ms)


def submit(pipe: Pipeline, job: ArqJob, queue_timeout_s: float) -> None:
    """Queue ``job`` on ``pipe``, and wake a worker. arq drops a job that no worker starts
    within the queue timeout."""
    pipe.psetex(job.key, int(queue_timeout_s * 1000), job.payload)
    pipe.zadd(keys.QUEUE_NAME, {job.arq_id: job.enqueued_ms})
    pipe.zadd(keys.PENDING, {job.arq_id: job.enqueued_ms})
    pipe.lpush(keys.WAKE, job.arq_id)
    pipe.ltrim(keys.WAKE, 0, keys.WAKE_CAP - 1)
