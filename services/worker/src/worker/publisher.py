"""Publishing every job's events: one writer per worker process, coalescing what arrives.

``emit`` never waits: the LLM read loop hands events over and goes on reading. One writer
task (the ``Batcher``) sends whatever all jobs of this worker produced while its previous
write was out, as one pipelined round trip of fenced appends (one per job), so a burst
costs one round trip. Adjacent tokens of a job are merged into one event: their
concatenation is the same text. With a ``gather_s`` window (``TOKEN_GATHER_MS``), while
the worker runs ``GATHER_FROM_STREAMS`` jobs or more, a token waits up to that long for
the tokens after it, so Redis appends, and every gateway reads, several tokens a step
instead of one: what a token costs Redis falls by about as many. A job's first output and
its final event never wait, and whenever a write goes, every job's pending events go with
it: a worker sends one write per window, however many jobs. Each job's batches are
numbered, so retrying a write whose reply was lost (Redis blinked) never duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import events as ev
from shared.event_log import Closing, EventLog
from shared.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

# Characters one merged token event holds at most: a fast model and a slow Redis would
# otherwise make one event of a whole answer, and a gateway reads up to 512 events at once.
MERGE_MAX = 4096
UNPUBLISHABLE = "the worker could not publish this answer's events (see its logs); it is incomplete"


class Fenced(Exception):
    """This attempt no longer owns the job: it was cancelled, ended or taken over."""


class Publisher:
    """One job attempt's events on their way to its stream."""

    def __init__(self, batcher: Batcher, job_id: str, owner: str) -> None:
        self.batcher = batcher
        self.job_id = job_id
        self.owner = owner
        self.published_output = False
        self.fenced = False  # another attempt or an outside end owns the stream now
        self.error: BaseException | None = None  # Redis failed it: nothing more is written
        self.rejected: BaseException | None = None  # an event of it could not be encoded
        self.final_replaced = False  # its final event was in a rejected batch: an error instead
        self.pending: list[ev.Event] = []
        self.batches = 0
        self.closing: Closing | None = None  # written with the final event
        self._closing: asyncio.Future[bool] | None = None

    def emit(self, event: ev.Event) -> None:
        if self.error is not None:
            raise self.error
        if self.rejected is not None:
            raise self.rejected
        if self.fenced:
            raise Fenced(self.job_id)
        if isinstance(event, ev.Token):
            if not event.text:
                return  # empty tokens are not sent
            last = self.pending[-1] if self.pending else None
            if isinstance(last, ev.Token) and len(last.text) + len(event.text) <= MERGE_MAX:
                self.pending[-1] = ev.Token(last.text + event.text)
                return
        self.pending.append(event)
        self.batcher.mark(self)

    async def close(self, final: ev.Event, closing: Closing | None = None) -> bool:
        """Publish what is pending and then ``final`` (with ``closing``, the session's turn
        and the job's usage, in one step); False if the job was not ours."""
        if self.fenced:
            return False
        if self.error is not None:
            raise self.error
        self.pending.append(final)
        self.closing = closing
        self._closing = asyncio.get_running_loop().create_future()
        self.batcher.mark(self)
        return await self._closing

    @property
    def closing_soon(self) -> bool:
        """Its final event waits to be written: it goes at once."""
        return self._closing is not None

    def take(self) -> tuple[int, list[ev.Event]]:
        batch, self.pending = self.pending, []
        self.batches += 1
        return self.batches, batch

    def written(self, batch: list[ev.Event], ok: bool) -> None:
        if not ok:
            self.fenced = True
        elif any(isinstance(e, ev.OUTPUT_EVENTS) for e in batch):
            self.published_output = True
        if (
            self._closing is not None
            and not self._closing.done()
            and (not ok or (batch and ev.is_final(batch[-1])))
        ):
            self._closing.set_result(ok)

    def failed(self, error: BaseException) -> None:
        self.error = error
        if self._closing is not None and not self._closing.done():
            self._closing.set_exception(error)

    def reject(self, error: BaseException, batch: list[ev.Event]) -> None:
        """A batch not written for an event Redis was never sent (no JSON form): the job
        stops, and still ends (the stream lacks that batch). A final event it carried is
        replaced by an error, written alone: a job left without one would hang until its
        heartbeat lapsed, and run again if it had no output."""
        self.rejected = error
        if batch and ev.is_final(batch[-1]):
            self.final_replaced = True
            self.pending = [ev.Error(UNPUBLISHABLE)]
            if self.closing is not None:  # its usage still counts; a failed job has no turn
                self.closing = dataclasses.replace(self.closing, turn=None)
            self.batcher.mark(self)


class Batcher:
    """The worker's one writer of events, for every job it runs."""

    def __init__(
        self,
        log: EventLog,
        redis_patience_s: float,
        gather_s: float = 0.0,
        gather_from: int = 0,
        running: Callable[[], int] = lambda: 0,
    ) -> None:
        self.log = log
        self.redis_patience_s = redis_patience_s
        self.gather_s = gather_s
        self.gather_from = gather_from  # jobs running from which the window applies
        self.running = running  # how many jobs run here now (the heartbeat tracks them)
        self._dirty: dict[Publisher, None] = {}  # publishers with pending events, in order
        # When the next write is due (loop time): at once for a first output or a final
        # event, else a gather window after the oldest pending event. None: nothing pending.
        self._due_at: float | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def publisher(self, job_id: str, owner: str) -> Publisher:
        return Publisher(self, job_id, owner)

    def mark(self, publisher: Publisher) -> None:
        due = asyncio.get_running_loop().time()
        if (
            publisher.published_output
            and not publisher.closing_soon
            and self.running() >= self.gather_from
        ):
            due += self.gather_s  # a later token, under load: it may wait for its followers
        self._dirty[publisher] = None
        if self._due_at is None or due < self._due_at:
            self._due_at = due
            self._wake.set()
        if self._task is None or self._task.done():
            # Of no job: the job whose event started it must not tag every job's log lines.
            self._task = asyncio.create_task(
                self._run(), name="event-batcher", context=contextvars.Context()
            )

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._due_at is None:
                continue
            if (wait_s := self._due_at - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait_s)
                self._wake.set()  # look again: it is due, or an earlier one came
                continue
            # Every job's pending events go with the one that is due: the round trip is paid
            # anyway, so a worker sends one write per window, however many jobs it runs.
            due, self._dirty, self._due_at = list(self._dirty), {}, None
            # A failed publisher writes nothing more: what follows a lost batch would leave
            # a hole in its stream (the gateways end the job once its heartbeat lapses).
            publishers = [p for p in due if p.pending and p.error is None]
            if not publishers:
                continue
            batches = [(p, *p.take()) for p in publishers]
            try:
                results = await self._write(batches)
            except Exception as exc:
                logger.error("could not publish events of %d jobs: %s", len(batches), exc)
                for publisher, _, _ in batches:
                    publisher.failed(exc)
                continue
            for (publisher, _, batch), result in zip(batches, results, strict=True):
                if isinstance(result, TypeError | ValueError):  # found before anything was sent
                    logger.error("job %s: an event has no JSON form: %s", publisher.job_id, result)
                    publisher.reject(result, batch)
                elif isinstance(result, Exception):
                    logger.error("could not publish events of job %s: %s", publisher.job_id, result)
                    publisher.failed(result)
                else:
                    publisher.written(batch, result)

    async def _write(
        self, batches: list[tuple[Publisher, int, list[ev.Event]]]
    ) -> list[bool | Exception]:
        """Write, riding out a short Redis outage rather than dropping events."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.redis_patience_s
        delay = 0.05
        request = [
            (p.job_id, p.owner, number, batch, p.closing if ev.is_final(batch[-1]) else None)
            for p, number, batch in batches
        ]
        while True:
            try:
                return await self.log.append_many(request)
            except (RedisConnectionError, RedisTimeoutError):
                if loop.time() + delay > give_up_at:
                    raise
                logger.warning("Redis unreachable; retrying the events of %d jobs", len(batches))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
