"""A job's events decoded, for the readers that re-encode them (the OpenAI API's): live
through the relay, or as stored now. The native dialect never comes here: its frames go
out as the relay made them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from shared.cursors import START
from shared.event_log import DATA

from .reader import PING
from .state import State

Event = tuple[float, dict[str, Any]]  # (the entry's time in seconds, the event)


async def relayed(state: State, job_id: str, new_chat: bool = False) -> AsyncIterator[Event | None]:
    """The job's events from its start until its final one, as the relay reads them;
    None for each ping the idle stream is due."""
    relay = state.shards.of_job(job_id).relay
    reader = relay.subscribe(job_id, START, new_chat)
    try:
        async for chunk in reader.frames_until_end(state.settings.ping_interval_s):
            if chunk == PING:
                yield None
                continue
            for frame in chunk.split(b"\n\n"):
                head, found, data = frame.partition(b"\ndata: ")
                if found:
                    yield _entry_time(head.rpartition(b"_")[2]), orjson.loads(data)
    finally:
        relay.unsubscribe(reader)


async def encoded(
    state: State,
    job_id: str,
    encode: Callable[[dict[str, Any]], list[bytes]],
    new_chat: bool = False,
) -> AsyncIterator[bytes]:
    """The job's events live, each as the frames ``encode`` makes of it (a dialect's
    encoder), the idle stream's pings kept: an event the dialect does not show is a ping,
    since it restarted the reader's wait for the next one (a gap of two intervals)."""
    async for entry in relayed(state, job_id, new_chat):
        if entry is None:
            yield PING
        else:
            out = encode(entry[1])
            yield b"".join(out) if out else PING


async def stored(state: State, job_id: str) -> AsyncIterator[Event]:
    """The job's events written so far."""
    async for entry_id, fields in state.shards.of_job(job_id).log.entries(job_id):
        yield _entry_time(entry_id), orjson.loads(fields[DATA])


def _entry_time(entry_id: bytes) -> float:
    return int(entry_id.partition(b"-")[0]) / 1000


async def unless_client_leaves(request: Request, answer: Awaitable[Response]) -> Response:
    """``answer``, unless the client hangs up first: then it is dropped (its reader leaves,
    and a ``GET``-kind job is cancelled after its grace)."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answering = asyncio.ensure_future(answer)
    leaving = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({answering, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answering, leaving):
            task.cancel()
    if answering.done() and not answering.cancelled():
        return answering.result()
    return Response(status_code=499)  # nobody is there to read it
