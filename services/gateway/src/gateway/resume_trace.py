"""A resumed reader's span: a reader that comes back to a job (a reconnect, another
gateway, a second tab) records its own span, in its client's trace if it sent a
``traceparent``, linked to the job's trace. It lasts as long as the reader's stream."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import orjson
from redis.exceptions import RedisError

from shared import tracing

from .state import State

logger = logging.getLogger(__name__)


def traced(
    state: State, job_id: str, frames: AsyncIterator[bytes], traceparent: str | None
) -> AsyncIterator[bytes]:
    """``frames``, under a ``streamgate.resume`` span when tracing is on (else as they are)."""
    if not tracing.enabled():
        return frames
    return _traced(state, job_id, frames, traceparent)


async def _traced(
    state: State, job_id: str, frames: AsyncIterator[bytes], traceparent: str | None
) -> AsyncIterator[bytes]:
    job_trace = None
    try:  # a Redis blip costs the link, never the stream
        request = await state.shards.of_job(job_id).log.request_of(job_id)
        job_trace = orjson.loads(request).get("traceparent") if request else None
    except RedisError as exc:
        logger.debug("resume of job %s not linked to its trace: %s", job_id, exc)
    span = tracing.start(
        "streamgate.resume",
        parent=traceparent,
        kind="SERVER",
        attributes={"streamgate.job.id": job_id},
        links=[job_trace],
    )
    assert span is not None
    sent = 0
    try:
        async for frame in frames:
            sent += len(frame)
            yield frame
    finally:
        span.set_attribute("streamgate.resume.bytes_sent", sent)
        span.end()
