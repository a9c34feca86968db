"""One client's view of one job: a bounded mailbox of SSE frames after its cursor.

The relay pushes pre-encoded frames; the client's response drains them, joined into one
write, and sends a ``: ping`` comment when nothing came for a while. Pings come from here,
in order with the events, so none can follow the final event. A reader that falls more than
``bound`` frames behind is dropped (its frames released at once): the client reconnects
with its last cursor and misses nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

logger = logging.getLogger(__name__)

PING = b": ping\n\n"


def entry_key(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id (``ms-seq``) as a tuple that orders like the stream."""
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


class Reader:
    """One client's view of one job: a mailbox of SSE frames after its cursor."""

    __slots__ = (
        "after",
        "bound",
        "ended",
        "finished",
        "first_token",
        "frames",
        "job_id",
        "started_at",
        "waiter",
    )

    def __init__(self, job_id: str, after: str, bound: int, started_at: float | None) -> None:
        self.job_id = job_id
        self.started_at = started_at  # set for a new chat: its latencies are measured
        self.first_token = started_at is not None  # the first token is still to be timed
        self.after = entry_key(after)
        self.bound = bound
        self.frames: list[bytes] = []
        self.ended = False  # no more frames will come: final event queued, or dropped
        self.finished = False  # the final event was queued: the client has it all
        self.waiter: asyncio.Future[bool] | None = None  # the response waiting for frames

    def push(self, frame: bytes, key: tuple[int, int], final: bool) -> None:
        if self.ended:
            return
        self.after = key
        self.frames.append(frame)
        if final:
            self.ended = self.finished = True
        elif len(self.frames) > self.bound:
            logger.warning(
                "job %s: a reader fell %d events behind; dropping it so it resumes from its cursor",
                self.job_id,
                self.bound,
            )
            self.frames.clear()
            self.ended = True
        _settle(self.waiter, True)

    def close(self, frame: bytes | None = None) -> None:
        """End this reader, with a last frame or cleanly (the client may resume)."""
        if not self.ended:
            if frame is not None:
                self.frames.append(frame)
            self.ended = True
            _settle(self.waiter, True)

    async def frames_until_end(self, ping_interval_s: float) -> AsyncIterator[bytes]:
        """SSE bytes as they come, pings while idle; returns after the final event."""
        loop = asyncio.get_running_loop()
        while True:
            if self.frames:
                chunk = b"".join(self.frames)
                self.frames.clear()
                yield chunk
                continue
            if self.ended:
                return
            # A bare future and a timer, not ``wait_for`` on an event: that starts a task
            # per wait, a tenth of the gateway's CPU when tokens trickle in one by one.
            waiter = self.waiter = loop.create_future()
            timer = loop.call_later(ping_interval_s, _settle, waiter, False)
            try:
                woken = await waiter
            finally:
                timer.cancel()
                self.waiter = None
            if not woken:
                yield PING


def _settle(waiter: asyncio.Future[bool] | None, woken: bool) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(woken)
