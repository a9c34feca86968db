"""Starting a job: count it into the queue, open its stream, hand it to arq, wake a worker."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Literal

import orjson
from arq.connections import ArqRedis

from shared import keys
from shared.cursors import new_job_id
from shared.event_log import EventLog
from shared.job_queue import arq_job, submit
from shared.sessions import SessionStore
from shared.settings import Settings

from .errors import Conflict, Unavailable
from .inputs import ChatRequest
from .state import State


class QueueFull(Unavailable):
    pass


async def enqueue(
    state: State, chat: ChatRequest, kind: Literal["get", "post"], identity: str
) -> str:
    """Enqueue one chat job for the key ``identity`` and return its id; its ``queued``
    event is written first."""
    job_id = new_job_id()
    if chat.session:
        # Sessions are per key: two keys never share a conversation.
        session = f"{identity[:12]}.{chat.session}" if identity else chat.session
        await _take_session(state.log, state.sessions, session, job_id, shown=chat.session)
        chat = replace(chat, session=session)
    try:
        await _enqueue(state.arq, state.log, state.settings, chat, kind, job_id, identity)
    except BaseException:
        if chat.session:
            await state.sessions.unlock(chat.session, job_id)
        raise
    return job_id


async def check_session(state: State, chat: ChatRequest, identity: str) -> None:
    """409 now if the session is busy, without taking it (for HEAD)."""
    if chat.session:
        session = f"{identity[:12]}.{chat.session}" if identity else chat.session
        holder = await state.sessions.holder(session)
        if holder is not None and not await state.log.is_over(holder):
            raise _busy(chat.session, holder)


def _busy(shown: str, holder: str) -> Conflict:
    return Conflict(
        f"session {shown} is still answering job {holder}; wait for its final event,"
        f" or cancel it with DELETE /chat/{holder}"
    )


async def _take_session(
    log: EventLog, sessions: SessionStore, session: str, job_id: str, shown: str
) -> None:
    """One job at a time per session (the double-texting rule): 409 while one runs."""
    holder = await sessions.lock(session, job_id)
    if holder is None:
        return
    if await log.is_over(holder) and await sessions.take_over(session, holder, job_id):
        return
    raise _busy(shown, holder)


async def _enqueue(
    arq: ArqRedis,
    log: EventLog,
    settings: Settings,
    chat: ChatRequest,
    kind: Literal["get", "post"],
    job_id: str,
    identity: str,
) -> None:
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
    request = orjson.dumps({**asdict(chat), "kind": kind})
    ttl_s = int(settings.queue_timeout_s + settings.job_timeout_s) + settings.stream_retention_s
    # One round trip: the stream with its `queued` event first, then the arq job.
    async with arq.pipeline(transaction=False) as pipe:
        await log.create(
            job_id,
            kind,
            identity,
            request,
            position=waiting + 1,
            ttl_s=ttl_s,
            watched_s=settings.disconnect_grace_s if kind == "get" else None,
            pipe=pipe,
        )
        submit(pipe, arq_job(job_id, arq_id=job_id), settings.queue_timeout_s)
        await pipe.execute()
