"""One client's view of one job: a bounded mailbox of SSE frames after its cursor.

The relay pushes pre-encoded frames; the client's response drains them, joined into one
write, and sends a ``: ping`` comment when nothing came for a while. Pings come from here,
in order with the events, so none can follow the final event.

A mailbox holding ``bound`` frames or ``bound_bytes`` bytes is full: the reader is paused,
takes nothing more, and the relay leaves it out of its reads until the client has taken
what it holds; then ``on_drained`` asks the relay to read on from the reader's cursor. So a
client that reads slowly (or not at all) holds at most a mailbox, whatever the job's size,
and the relay never waits on it; one that takes nothing for SEND_TIMEOUT_S is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

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
        "bound_bytes",
        "ended",
        "finished",
        "first_token",
        "frames",
        "job_id",
        "on_drained",
        "paused",
        "pending_bytes",
        "started_at",
        "waiter",
    )

    def __init__(
        self,
        job_id: str,
        after: str,
        bound: int,
        started_at: float | None,
        bound_bytes: int = 1 << 20,
        on_drained: Callable[[Reader], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.started_at = started_at  # set for a new chat: its latencies are measured
        self.first_token = started_at is not None  # the first token is still to be timed
        self.after = entry_key(after)
        self.bound = bound
        self.bound_bytes = bound_bytes
        self.on_drained = on_drained
        self.paused = False  # full: takes nothing until the client has taken what it holds
        self.pending_bytes = 0
        self.frames: list[bytes] = []
        self.ended = False  # no more frames will come: final event queued, or dropped
        self.finished = False  # the final event was queued: the client has it all
        self.waiter: asyncio.Future[bool] | None = None  # the response waiting for frames

    def push(self, frame: bytes, key: tuple[int, int], final: bool) -> bool:
        """Take the frame after this reader's cursor; False when it takes no more now."""
        if self.ended or self.paused:
            return False
        self.after = key
        self.frames.append(frame)
        self.pending_bytes += len(frame)
        if final:
            self.ended = self.finished = True
        elif len(self.frames) >= self.bound or self.pending_bytes >= self.bound_bytes:
            self.paused = True
        _settle(self.waiter, True)
        return True

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
                self.pending_bytes = 0
                resume = self.paused
                yield chunk
                if resume:  # taken and sent: one mailbox at a time, never two
                    self.paused = False
                    if self.on_drained is not None:
                        self.on_drained(self)
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
