"""Publishes one job's events to its stream, coalescing what arrives while a write is out.

``emit`` never waits: the LLM read loop hands events over and goes on reading. One writer
task sends everything that piled up during the previous write as a single fenced append, so
a burst of tokens costs one round trip, and a lone token goes out at once (no added delay).
Adjacent tokens are merged into one event: their concatenation is the same text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import events as ev
from shared.event_log import EventLog

logger = logging.getLogger(__name__)


class Fenced(Exception):
    """This attempt no longer owns the job: it was cancelled, ended or taken over."""


class Publisher:
    def __init__(self, log: EventLog, job_id: str, owner: str, redis_patience_s: float) -> None:
        self.log = log
        self.job_id = job_id
        self.owner = owner
        self.redis_patience_s = redis_patience_s
        self.published_output = False
        self.fenced = False  # another attempt or an outside end owns the stream now
        self._pending: list[ev.Event] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    def emit(self, event: ev.Event) -> None:
        if self._writer is not None and self._writer.done():
            self._writer.result()  # re-raises why the writer stopped (Fenced, Redis down)
        if isinstance(event, ev.Token):
            if not event.text:
                return  # empty tokens are not sent
            if self._pending and isinstance(self._pending[-1], ev.Token):
                self._pending[-1] = ev.Token(self._pending[-1].text + event.text)
                return
        self._pending.append(event)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop())
        self._wake.set()

    async def close(self, final: ev.Event) -> bool:
        """Flush what is pending, then the final event; False if the job was not ours."""
        if self._writer is not None:
            self._closing = True
            self._wake.set()
            with contextlib.suppress(Fenced):
                await self._writer
        if self.fenced:
            return False
        batch, self._pending = [*self._pending, final], []
        return await self._append(batch)

    async def _write_loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._pending = self._pending, []
            if not await self._append(batch):
                raise Fenced(self.job_id)

    async def _append(self, batch: list[ev.Event]) -> bool:
        """Append, riding out a short Redis outage rather than dropping events."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.redis_patience_s
        delay = 0.05
        while True:
            try:
                ok = await self.log.append(self.job_id, self.owner, batch)
                break
            except (RedisConnectionError, RedisTimeoutError):
                if loop.time() + delay > give_up_at:
                    raise
                logger.warning("job %s: Redis unreachable, retrying the append", self.job_id)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        if not ok:
            self.fenced = True
            return False
        if any(isinstance(e, ev.OUTPUT_EVENTS) for e in batch):
            self.published_output = True
        return True
