"""The arq job of a chat: what the event log's scripts write to put it on arq's queue (a
new chat, a hand-back), as ``ArqRedis.enqueue_job`` would, without its WATCH/MULTI round
trips: those guard against a reused job id, and ours are random or suffixed. Only the job
id travels through arq (and its logs); the request waits in the job's meta hash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from arq.constants import job_key_prefix
from arq.jobs import serialize_job


@dataclass(frozen=True)
class ArqJob:
    """One arq job for a chat: the Redis writes that put it on the queue."""

    arq_id: str
    key: str  # arq's job key, holding the serialized call
    payload: bytes


def arq_job(job_id: str, arq_id: str) -> ArqJob:
    """The arq job that runs ``job_id`` under ``arq_id`` (``Keys.arq_id``). A job handed
    back gets a fresh one: arq keeps a stopped attempt's id "in progress" for a long while."""
    # arq's own record of when (its logs); our scores of the job are Redis's clock
    payload = serialize_job("chat", (job_id,), {}, None, int(time.time() * 1000))
    return ArqJob(arq_id, job_key_prefix + arq_id, payload)
