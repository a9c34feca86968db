"""Starting a job: take its session, then, in one round trip (the event log's ``create``),
count it into the queue, open its stream, hand it to arq and wake a worker."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any, Literal

import orjson
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import events as ev
from shared import tracing
from shared.cursors import new_job_id
from shared.event_log import EventLog
from shared.sessions import SessionStore

from .errors import Conflict, Unavailable
from .inputs import ChatRequest
from .shards import CREATE_WITHIN_S, Shard
from .state import State


class QueueFull(Unavailable):
    pass


async def enqueue(
    state: State,
    chat: ChatRequest,
    kind: Literal["get", "post"],
    identity: str,
    traceparent: str | None = None,
) -> str:
    """Enqueue one chat job for the key ``identity`` and return its id; its ``queued``
    event is written first. ``traceparent``: the client's, to join its trace."""
    if not chat.session:
        return await enqueue_request(state, asdict(chat), kind, identity, traceparent)
    session, shard = _session_home(state, identity, chat.session)
    job_id = new_job_id(shard.index)
    # Taken before the trace starts: a 409 is no job, and leaves no span.
    await _take_session(shard.log, shard.sessions, session, job_id, shown=chat.session)
    fields = asdict(replace(chat, session=session))
    try:
        with _traced(kind, traceparent):
            await _enqueue(state, shard, fields, kind, job_id, identity)
    except RedisTimeoutError:
        # Unlocking would wait out the same hung Redis: a lock whose job never came to be
        # is taken over by the session's next chat (its holder is over).
        raise
    except BaseException:
        await shard.sessions.unlock(session, job_id)
        raise
    return job_id


async def enqueue_request(
    state: State,
    request: dict[str, Any],
    kind: Literal["get", "post"],
    identity: str,
    traceparent: str | None = None,
    shard: Shard | None = None,
) -> str:
    """Enqueue a job without a session (an OpenAI API request brings its conversation
    whole) in ``shard``, or else in the next shard in turn that takes it."""

    async def attempt(shard: Shard) -> str:
        job_id = new_job_id(shard.index)
        await _enqueue(state, shard, request, kind, job_id, identity)
        return job_id

    with _traced(kind, traceparent):  # one span, however many shards are tried
        if shard is not None:
            return await attempt(shard)
        # A shard that refuses the write (full, read-only, loading) wrote nothing: the next.
        refused = (QueueFull, OutOfMemoryError, ReadOnlyError, BusyLoadingError)
        return await state.shards.place(attempt, also_next_on=refused)


async def check_session(state: State, chat: ChatRequest, identity: str) -> None:
    """409 now if the session is busy, without taking it, and 503 when the chat could not
    start for want of Redis (for HEAD)."""
    if not chat.session and len(await state.shards.down()) == len(state.shards):
        raise RedisConnectionError("no Redis shard is reachable")
    if chat.session:
        session, shard = _session_home(state, identity, chat.session)
        holder = await shard.sessions.holder(session)
        if holder is not None and not await shard.log.is_over(holder):
            raise _busy(chat.session, holder)


async def cancel_job(state: State, job_id: str) -> None:
    """End the job as cancelled (DELETE, or a new AI SDK message), counted if this ended it."""
    if await state.shards.of_job(job_id).log.end(job_id, ev.CANCELLED):
        state.metrics.jobs.labels("cancelled").inc()


def _session_home(state: State, identity: str, name: str) -> tuple[str, Shard]:
    """A session's name in Redis and its shard. Sessions are per key: two keys never share a
    conversation. A session's jobs run in its shard, where its turns are written with each
    job's final event."""
    session = f"{identity[:12]}.{name}" if identity else name
    return session, state.shards.home(session)


def _busy(shown: str, holder: str) -> Conflict:
    return Conflict(
        f"session {shown} is still answering job {holder}; wait for its final event,"
        f" or cancel it with DELETE /chat/{holder}",
        details={"job_id": holder},  # a client whose own request this was can follow it
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


@contextmanager
def _traced(kind: str, traceparent: str | None) -> Iterator[None]:
    """The job's trace starts here (a child of the client's, if it sent one) and travels
    in its request: the worker's spans join it (shared/tracing.py)."""
    attributes = {"streamgate.job.kind": kind}
    with tracing.span(
        "streamgate.enqueue", parent=traceparent, kind="SERVER", attributes=attributes
    ):
        yield


async def _enqueue(
    state: State,
    shard: Shard,
    fields: dict[str, Any],
    kind: Literal["get", "post"],
    job_id: str,
    identity: str,
) -> None:
    settings = state.settings
    job = {**fields, "kind": kind}
    traceparent = tracing.traceparent()  # the enqueue span's, when tracing is on
    if traceparent is not None:
        job["traceparent"] = traceparent
        tracing.annotate({"streamgate.job.id": job_id})  # the last shard tried: the job's
    create = functools.partial(
        shard.log.create,
        job_id,
        kind,
        identity,
        orjson.dumps(job),
        watched=kind == "get",
        max_queued=settings.max_queued_jobs,
        # A hung Redis that wakes with it unread must not run it: its client was
        # answered otherwise (a 503, the job on another shard).
        clock=shard.clock,
        answer_within_s=CREATE_WITHIN_S,
    )
    position = await create()
    if position == 0:  # run in time, yet judged late: the clock's estimate was off
        position = await create()  # and is now set right by its answer
    if position == 0:
        raise RedisTimeoutError(f"{shard.name} ran the job's create too late to be waited for")
    if position < 0:
        raise QueueFull(
            f"the queue is full ({-position} jobs waiting, MAX_QUEUED_JOBS is"
            f" {settings.max_queued_jobs}); retry shortly"
        )
