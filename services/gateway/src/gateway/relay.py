"""The relay: one multiplexed reader per shard in each gateway process, fanning events out
to clients.

Decisions a reader might want to undo:

- One ``XREAD BLOCK`` loop reads every stream this process relays, on one connection,
  instead of one blocking connection per client (a pool refuses the 101st, Redis stops at
  ``maxclients``). Readers of one job share its entry in the XREAD, at the lowest cursor
  among them; each gets only the entries after its own cursor.
- A new reader must not wait out a BLOCK: it appends to this process's private *wake*
  stream, which the loop always reads, so the XREAD returns and is re-issued with the new
  stream in it.
- Past ``RELAY_MULTIPLEX_MAX`` streams, naming every stream in each XREAD costs Redis more
  than the events do (~2.4 µs per stream and call). The loop then blocks on the doorbell
  instead: every write to a job's stream also appends that stream's key to one shared
  stream (``sg:activity``, in the same function; one entry names every stream of a
  worker's write). A worker's write adds what it wrote and the entry it follows: the loop
  delivers that from the doorbell to the readers that have everything up to it, and reads
  from their cursors only the streams that rang without it or have a reader behind (a
  stream's read, its key found among tens of thousands, was most of what Redis spent on a
  gateway's token).
  After any Redis error it reads every stream once (doorbells may have been lost), and
  silent streams are read anyway every ``SWEEP_S``: a doorbell trimmed away unread costs
  a few seconds, never an event.
- The functions ring only while the doorbell stream exists, for its XADD was most of what
  Redis spent per token with no gateway listening. A gateway following it keeps it alive:
  it creates it with a marker entry (whose id is where it reads from) and a TTL, renews
  the TTL, and re-reads every stream when it may have lapsed (a renewal late, or finding
  it gone), as after an error.
- Each client has a bounded mailbox of pre-encoded SSE frames (reader.py). A client that
  reads slower than its job's events come fills it and is paused: the loop leaves it out of
  its reads (never waiting on it) until the client has taken what it holds, then reads on
  from its cursor. However large the job, a client holds at most one mailbox.
- Other duties look at what the relay holds, and it knows none of them: renewing the
  relayed jobs' ``watched`` keys (watched.py), checking its silent jobs (idle_check.py).
- After ``redis_down_close_s`` (``WORKER_LOST_TIMEOUT_S``) without its Redis it ends every
  stream with an error: the jobs' workers cannot write either and have given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from shared import events as ev
from shared.cursors import MADE_UP
from shared.event_log import DATA, FINAL, EventLog
from shared.held_connection import HeldConnection
from shared.settings import Settings
from shared.shards import ShardSpec
from shared.supervise import supervise
from shared.tasks import cancel_and_wait

from .metrics import GatewayMetrics
from .reader import Reader, entry_key

logger = logging.getLogger(__name__)

BLOCK_MS = 5000
CLOCK_SLACK_S = 0.01  # asyncio may run a timer up to its clock's resolution early
READ_COUNT = 512
READ_BATCH = 1000  # doorbell mode: streams per XREAD of the streams that rang
RING_COUNT = 512  # doorbells per read: one may name a worker's every job
SWEEP_S = 5.0  # doorbell mode: how often a silent stream is read anyway
DOORBELL_TTL_MS = 30_000  # the doorbell outlives its last renewal this long
DOORBELL_RENEW_S = 10.0  # renewed this often; a block (5 s) may delay it
DOORBELL_SAFE_S = 25.0  # past this since a renewal was sent, it may have lapsed: read all


class _Job:
    __slots__ = ("_cursor", "key", "last_activity", "prefix", "read_from", "readers", "swept")

    def __init__(self, job_id: str, key: str, now: float) -> None:
        self.key = key.encode()
        self.prefix = b"id: " + job_id.encode() + b"_"
        self.readers: set[Reader] = set()
        self.last_activity = now
        self.swept = now  # when the idle check last had it read regardless of the doorbell
        self.read_from: tuple[int, int] | None = None  # the start of the XREAD in flight
        self._cursor = b""

    def cursor(self) -> bytes | None:
        """Where the next XREAD of this job starts: its furthest-behind reader that is not
        paused (None: every reader is, so the job is not read); noted, since only readers
        at or past it may take what that read returns."""
        if len(self.readers) == 1:
            only = next(iter(self.readers))
            start = None if only.paused else only.after
        else:
            start = min((r.after for r in self.readers if not r.paused), default=None)
        if start is None:
            self.read_from = None
            return None
        if start != self.read_from:  # most streams of an XREAD have not moved since the last
            self.read_from = start
            self._cursor = b"%d-%d" % start
        return self._cursor


class Relay:
    def __init__(
        self,
        redis: Redis,
        blocking_redis: Redis,
        log: EventLog,
        settings: Settings,
        metrics: GatewayMetrics,
        shutting_down: anyio.Event,
        shard: ShardSpec | None = None,
    ) -> None:
        """``shard``: the shard it reads, named in its task and logs when one of several."""
        self.redis = redis
        self._suffix = shard.suffix if shard else ""
        self._gather_s = settings.relay_gather_ms / 1000
        self._where = shard.where if shard else ""
        self.metrics = metrics
        # One XREAD after another; the client has no socket timeout, this bounds each.
        self._reads = HeldConnection(blocking_redis, timeout_s=BLOCK_MS / 1000 + 5)
        self.log = log
        self.settings = settings
        self.jobs: dict[str, _Job] = {}
        # Bytes, as XREAD's raw reply names streams and entries.
        self._wake_key = log.keys.gateway_wake(secrets.token_hex(8)).encode()
        self._wake_cursor = b"0-0"
        self._activity_cursor: str | None = None  # None: not following the doorbell
        self._doorbell_renewed = 0.0  # when the last renewal that held was sent (loop time)
        self._fresh: set[str] = set()  # jobs to read at once (doorbell mode)
        self._wake_pending = False
        self._wake_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._redis_down_since: float | None = None
        self._close_timer: asyncio.TimerHandle | None = None  # ends its streams when due
        self._read_errors = 0
        self._dropped_seen = 0
        self._unreadable = False  # a doorbell entry could not be read (logged once)
        self.joined: set[str] = set()  # jobs relayed here since watched.py last marked them
        self.shutting_down = shutting_down  # one for the process: set on SIGTERM
        loop_time = asyncio.get_running_loop().time
        self._now = loop_time

    @property
    def redis_down_since(self) -> float | None:
        """Since when (loop time) the read loop cannot reach Redis, or None."""
        return self._redis_down_since

    @property
    def open_readers(self) -> int:
        return sum(len(job.readers) for job in self.jobs.values())

    async def start(self) -> None:
        restarted = self.metrics.background_restarts.labels
        self._tasks = [
            asyncio.create_task(
                supervise(
                    f"relay-read{self._suffix}", self._read_loop, lambda n: restarted(n).inc()
                ),
                name=f"relay-read{self._suffix}",
            ),
            asyncio.create_task(self._close_on_shutdown(), name="relay-shutdown"),
        ]

    async def _close_on_shutdown(self) -> None:
        """End every stream cleanly when the server stops (sse-starlette sets the event on
        SIGTERM), so each response completes and its client resumes on another gateway."""
        await self.shutting_down.wait()
        self.close_all()

    def close_all(self) -> None:
        for job in self.jobs.values():
            for reader in job.readers:
                reader.close()
        self.jobs.clear()

    async def stop(self) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        self.close_all()
        await cancel_and_wait([*self._tasks, self._wake_task])
        if self._side_tasks:  # the grace of jobs whose readers just left must be recorded
            await asyncio.wait(self._side_tasks, timeout=5)
        with contextlib.suppress(RedisError):
            await self.redis.delete(self._wake_key)

    def subscribe(self, job_id: str, after: str, new_chat: bool = False) -> Reader:
        reader = Reader(
            job_id,
            after,
            self.settings.relay_buffer_events,
            self._now() if new_chat else None,
            bound_bytes=self.settings.relay_buffer_bytes,
            on_drained=self._drained,
        )
        self.metrics.open_streams.inc()
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = _Job(job_id, self.log.keys.events(job_id), self._now())
            self.joined.add(job_id)
        job.readers.add(reader)
        self._fresh.add(job_id)
        self._wake()
        return reader

    def _drained(self, reader: Reader) -> None:
        """A paused reader's client took what it held: read on from its cursor."""
        if reader.job_id in self.jobs:
            self._fresh.add(reader.job_id)
            self._wake()

    def unsubscribe(self, reader: Reader) -> None:
        self.metrics.open_streams.dec()
        job = self.jobs.get(reader.job_id)
        if job is not None:
            job.readers.discard(reader)
            if not job.readers:
                del self.jobs[reader.job_id]
        if not reader.finished and reader.job_id not in self.jobs:
            # The last reader here left before the end (it went away, was too slow, or
            # this gateway is stopping): its grace starts now, in full.
            task = asyncio.create_task(self._watched(reader.job_id))
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    async def _watched(self, job_id: str) -> None:
        with contextlib.suppress(RedisError):
            grace_ms = self.log.timing.grace_ms
            await self.redis.set(self.log.keys.watched(job_id), b"1", px=grace_ms)

    def _wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            self._wake_task = asyncio.create_task(self._send_wake())

    async def _send_wake(self) -> None:
        # Cleared before the write: a reader arriving while it is in flight may have missed
        # the read it wakes, so it sends its own.
        self._wake_pending = False
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {b"w": b"1"}, maxlen=16, approximate=True)
                pipe.expire(self._wake_key, 3600)
                await pipe.execute()
        except RedisError:
            pass  # the read loop is failing too; it will pick the reader up when Redis is back

    async def _read_loop(self) -> None:
        delay = 0.05
        while True:
            began = self._now()
            try:
                if len(self.jobs) > self.settings.relay_multiplex_max:
                    await self._read_rung()
                else:
                    self._activity_cursor = None
                    await self._read_all()
            except (RedisError, OSError) as exc:
                self._activity_cursor = None  # doorbells may have been lost
                self._read_errors += 1
                if self._redis_down_since is None:
                    # Unanswered since this read began: a hung Redis is found only when the
                    # read's deadline (its block and 5 s) ends, which the bound includes.
                    self._redis_down_since = began
                    logger.warning("relay lost Redis%s (%s); retrying", self._where, exc)
                    due_in = began + self.log.timing.redis_down_close_s - self._now()
                    self._close_timer = asyncio.get_running_loop().call_later(
                        max(due_in, 0.0) + CLOCK_SLACK_S, self._close_if_down_too_long
                    )
                self._close_if_down_too_long()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            except Exception:  # never let one bad entry stop every stream of this process
                logger.exception("relay read failed; reading every stream again")
                self._activity_cursor = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if self._redis_down_since is not None:
                logger.info("relay reached Redis%s again", self._where)
                self._redis_down_since = None
                if self._close_timer is not None:
                    self._close_timer.cancel()
            if self._gathering():
                await asyncio.sleep(self._gather_s)
            delay = 0.05

    @property
    def read_failures(self) -> int:
        """Reads that failed, or found their connection closed by Redis between two reads:
        Redis may have restarted empty, and the idle check then looks at every silent job."""
        return self._read_errors + self._reads.dropped

    def _gathering(self) -> bool:
        """Whether to let more events come before the next read, for it to take them at once:
        under load only, and not when a reader joined or drained during this read (its
        stream is read now)."""
        return (
            self._gather_s > 0
            and not self._fresh
            and len(self.jobs) >= self.settings.gather_from_streams
        )

    def _close_if_down_too_long(self) -> None:
        down = self._redis_down_since
        if down is None or not self.jobs:
            return
        if self._now() - down >= self.log.timing.redis_down_close_s:
            logger.warning(
                "Redis%s down for %.0f s: ending %d streams with an error",
                self._where,
                self._now() - down,
                self.open_readers,
            )
            for job_id in list(self.jobs):
                self.end_lost(job_id, ev.REDIS_UNREACHABLE)

    async def _read_all(self) -> None:
        """One blocking XREAD over every stream this process relays."""
        streams: dict[Any, Any] = {self._wake_key: self._wake_cursor}
        for job in self.jobs.values():
            if (cursor := job.cursor()) is not None:
                streams[job.key] = cursor
        self._fresh.clear()  # this read covers them
        for key, entries in await self._xread(streams, READ_COUNT, BLOCK_MS):
            if key == self._wake_key:
                self._wake_cursor = entries[-1][0]
            else:
                self._deliver(self.log.keys.job_of_events(key), entries)

    async def _read_rung(self) -> None:
        """Block on the doorbell, then read the streams that rang (and new readers')."""
        if self._reads.dropped != self._dropped_seen:  # Redis closed it: restarted, maybe
            self._dropped_seen = self._reads.dropped
            self._activity_cursor = None  # open the doorbell again, and read every stream
        since = self._now() - self._doorbell_renewed
        if self._activity_cursor is None or since >= DOORBELL_SAFE_S:
            if not await self._open_doorbell():
                await self._read_all()  # Redis refuses writes (out of memory): read them all
                return
        elif since >= DOORBELL_RENEW_S and not await self._renew_doorbell():
            return  # it was gone: the next read opens it again and reads every stream
        streams: dict[Any, Any] = {
            self._wake_key: self._wake_cursor,
            self.log.keys.activity: self._activity_cursor,
        }
        rung = await self._xread(streams, RING_COUNT, None if self._fresh else BLOCK_MS)
        for key, entries in rung:
            if key == self._wake_key:
                self._wake_cursor = entries[-1][0]
                continue
            self._activity_cursor = entries[-1][0].decode()
            for _, fields in entries:
                self._take_rung(fields)
        fresh = [job_id for job_id in self._fresh if job_id in self.jobs]
        self._fresh.clear()
        for start in range(0, len(fresh), READ_BATCH):
            chunk = [self.jobs[j] for j in fresh[start : start + READ_BATCH] if j in self.jobs]
            cursors = {job.key: c for job in chunk if (c := job.cursor()) is not None}
            if not cursors:
                continue
            found = await self._xread(cursors, READ_COUNT)
            for key, entries in found:
                job_id = self.log.keys.job_of_events(key)
                self._deliver(job_id, entries)
                if len(entries) >= READ_COUNT:
                    self._fresh.add(job_id)  # more may be waiting

    def _take_rung(self, fields: list[bytes]) -> None:
        """One doorbell entry (``_rung``); one this release cannot read (a later release's
        workers', during a rollback) has every stream read instead."""
        try:
            self._rung(fields)
        except (IndexError, ValueError, UnicodeDecodeError):
            if not self._unreadable:
                logger.warning(
                    "a doorbell entry%s this gateway cannot read (from workers of a later"
                    " release? upgrade the gateways first); reading every stream: %.200r",
                    self._where,
                    fields,
                )
            self._unreadable = True
            self._fresh.update(self.jobs)

    def _rung(self, fields: list[bytes]) -> None:
        """One doorbell entry: per stream it names (``k``; b"": a marker), what the write
        added (``p``, the stream's last entry before it, then ``i``/``d``/``f`` per entry),
        if it says. That is delivered here to the readers that have every entry up to ``p``;
        a stream named alone, or with a reader behind, is read."""
        at, end = 0, len(fields)
        while at < end:
            key = fields[at + 1]  # fields[at] is b"k"
            group = at = at + 2
            while at < end and fields[at] != b"k":
                at += 2
            if not key or (job_id := self.log.keys.job_of_events(key)) not in self.jobs:
                continue
            if job_id in self._fresh or not self._deliver_group(job_id, fields[group:at]):
                self._fresh.add(job_id)

    def _deliver_group(self, job_id: str, group: list[bytes]) -> bool:
        """Deliver a doorbell group (``p`` <last before>, then ``i``/``d``[/``f``] per
        entry) if every reader that is not paused has all up to ``p``; False if it is not
        one, or a reader is behind (its stream is to be read)."""
        if len(group) < 6 or group[0] != b"p" or not group[1]:
            return False
        job = self.jobs[job_id]
        before = entry_key(group[1])
        if any(not (r.paused or r.ended) and r.after < before for r in job.readers):
            return False
        entries: list[tuple[bytes, list[bytes]]] = []
        for at in range(2, len(group), 2):
            name, value = group[at], group[at + 1]
            if name == b"i":
                entries.append((value, []))
            elif entries:  # b"d" <data>, b"f" b"1": the entry's fields as its stream holds them
                entries[-1][1].extend((name, value))
        self._deliver(job_id, entries, before)
        return True

    async def _open_doorbell(self) -> bool:
        """Make sure the functions ring, and follow from a marker: any write before it is
        read from every stream now, any after it rang after it. False if Redis refused."""
        sent = self._now()
        self._activity_cursor = None
        marker, renewed = await self._reads.run(
            [
                ("XADD", self.log.keys.activity, "*", "k", b""),
                ("PEXPIRE", self.log.keys.activity, DOORBELL_TTL_MS),
            ]
        )
        if isinstance(marker, ResponseError) or renewed != 1:
            return False
        self._activity_cursor = marker.decode()
        self._doorbell_renewed = sent
        self._fresh.update(self.jobs)
        return True

    async def _renew_doorbell(self) -> bool:
        """Renew it; False if it was gone (Redis restarted empty, flushed): writes since
        may not have rung."""
        sent = self._now()
        if await self._reads.call("PEXPIRE", self.log.keys.activity, DOORBELL_TTL_MS) == 1:
            self._doorbell_renewed = sent
            return True
        self._activity_cursor = None
        return False

    async def _xread(
        self, streams: dict[Any, Any], count: int, block: int | None = None
    ) -> list[tuple[bytes, list[tuple[bytes, list[bytes]]]]]:
        """XREAD's raw reply: per stream, its entries as (id, [field, value, ...])."""
        args: list[Any] = ["XREAD", "COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        args += ["STREAMS", *streams.keys(), *streams.values()]
        return await self._reads.call(*args) or []

    def _deliver(
        self,
        job_id: str,
        entries: list[tuple[bytes, list[bytes]]],
        read_from: tuple[int, int] | None = None,
    ) -> None:
        """Entries of a job's stream, all those after ``read_from`` (by default where the
        job's read in flight started), to each reader that has every entry up to it."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        job.last_activity = self._now()
        readers = list(job.readers)
        read_from = read_from or job.read_from
        now = job.last_activity
        for entry_id, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            position = entry_key(entry_id)
            final = FINAL in fields
            data = fields[DATA]
            token = data.startswith(b'{"token"')
            frame = job.prefix + entry_id + b"\ndata: " + data + b"\n\n"
            for reader in readers:
                # A reader that joined behind the read in flight must not take its entries:
                # it would skip those in between. The next read starts at its cursor.
                if position > reader.after and read_from is not None and reader.after >= read_from:
                    if not reader.push(frame, position, final):
                        continue  # paused: it is read again from its cursor once drained
                    if reader.started_at is not None:
                        self._measure(reader, now, token, final)
                    if token:
                        self.metrics.tokens.inc()
        for reader in readers:
            if reader.ended:
                job.readers.discard(reader)
        if not job.readers:
            del self.jobs[job_id]

    def _measure(self, reader: Reader, now: float, token: bool, final: bool) -> None:
        assert reader.started_at is not None
        if token and reader.first_token:
            self.metrics.time_to_first_token.observe(now - reader.started_at)
            reader.first_token = False
        if final:
            self.metrics.time_to_final.observe(now - reader.started_at)

    def idle_since(self, since: float) -> list[str]:
        """The jobs relayed here that have delivered nothing since ``since`` (loop time)."""
        return [job_id for job_id, job in self.jobs.items() if job.last_activity <= since]

    def sweep(self, idle: list[str]) -> None:
        """In doorbell mode, read silent streams regardless, each at most every SWEEP_S, in
        case a doorbell was trimmed away unread (reading 10,000 streams every idle check
        cost a third of the relay)."""
        if self._activity_cursor is None:
            return
        now = self._now()
        sweep = [j for j in idle if j in self.jobs and now - self.jobs[j].swept >= SWEEP_S]
        for job_id in sweep:
            self.jobs[job_id].swept = now
        if sweep:
            self._fresh.update(sweep)
            self._wake()

    def end_lost(self, job_id: str, why: str = ev.JOB_LOST) -> None:
        """Redis no longer knows the job (restarted empty, or the stream expired) or cannot
        be reached: its readers here get an error after their cursor."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return
        data = ev.encode(ev.Error(why))
        for reader in job.readers:
            ms, seq = reader.after
            # No entry of the stream: a cursor of its own (cursors.MADE_UP), final like the
            # event it names: a reconnect with it gets 204.
            made_up = job.prefix + f"{ms}-{seq}{MADE_UP}".encode()
            reader.close(made_up + b"\ndata: " + data + b"\n\n")
