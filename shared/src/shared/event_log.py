"""The event log: the one seam over the Redis streams that carry every job's events.

Writes go through Lua scripts so that each is atomic with the job's state in its meta hash:

- ``create`` writes the ``queued`` event at enqueue, so the events URL works at once.
- ``claim`` lets a worker's attempt own the job. A job that already published output is
  never run again: the new attempt ends it with an error instead (arq may run a job twice).
- ``append`` is fenced by the owning attempt: a stale attempt, or any writer after the final
  event, writes nothing and learns it should stop.
- ``release`` hands a job that produced no output back to the queue (worker shutdown).
- ``end`` ends a job from outside (a cancel); ``check_stalled`` is the
  watchdog's: it ends a job whose worker stopped its heartbeat after output, hands one back
  to the queue when its worker died before any output, and ends one that no worker started
  in time. The checks run in the scripts, so two gateways watching one job cannot both act.

Every job stream thus ends with exactly one final event, and nothing follows it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Literal

from arq.constants import job_key_prefix
from redis.asyncio import Redis

from . import events as ev
from . import keys
from .event_scripts import APPEND, CHECK, CLAIM, CREATE, END, RELEASE
from .job_queue import arq_job
from .lua import Scripts

Entry = tuple[bytes, dict[bytes, bytes]]  # (stream entry id, fields) as Redis returns them
DATA = b"d"
FINAL = b"f"

# A job whose workers die (or stop) before any output is run again at most this often.
MAX_REQUEUES = 3

ClaimResult = Literal["run", "busy", "gone", "final", "expired", "lost", "unwatched"]
Claim = tuple[ClaimResult, bytes | None]  # and the job's request, for "run"


def _job_keys(job_id: str) -> list[str]:
    return [
        keys.meta_key(job_id),
        keys.events_key(job_id),
        keys.alive_key(job_id),
        keys.deadline_key(job_id),
    ]


class EventLog:
    def __init__(self, redis: Redis, retention_s: int, queue_timeout_s: float) -> None:
        self.redis = redis
        self.retention_s = retention_s
        self.queue_timeout_ms = int(queue_timeout_s * 1000)
        self._scripts = Scripts(redis)
        self._too_many = ev.encode(ev.Error(ev.TOO_MANY_ATTEMPTS))
        self._worker_lost = ev.encode(ev.Error(ev.WORKER_LOST))
        self._no_worker = ev.encode(ev.Error(ev.NO_WORKER))
        self._client_gone = ev.encode(ev.Error(ev.CLIENT_GONE))

    async def create(
        self,
        job_id: str,
        kind: str,
        key: str,
        request: bytes,
        ttl_s: int,
        watched_s: float | None,
        max_queued: int,
    ) -> int:
        """Start the job, in one round trip: its stream with the ``queued`` event, and its
        arq job, a worker woken. Returns its place in the queue, or, when ``max_queued``
        jobs already wait, minus their number (and nothing is written).

        ``watched_s`` (GET jobs): the job counts as read for this long, until a relay renews it.
        """
        before, _, after = ev.encode(ev.Queued(job_id, 0)).rpartition(b"0")
        job = arq_job(job_id, arq_id=job_id)
        script_keys = [
            *_job_keys(job_id),
            job.key,
            keys.QUEUE_NAME,
            keys.PENDING,
            keys.WAKE,
            keys.watched_key(job_id),
        ]
        args: list[str | bytes | int] = [
            kind,
            request,
            before,
            after,
            self.queue_timeout_ms,
            ttl_s,
            int(watched_s * 1000) if watched_s else 0,
            key,
            max_queued,
            job.enqueued_ms,
            job.arq_id,
            job.payload,
            keys.WAKE_CAP - 1,
            keys.WAKE_REQUEST_MAX,
        ]
        (position,) = await self._scripts.run_all(CREATE, [(script_keys, args)])
        return int(position)

    async def claim(self, job_id: str, queued_as: str, owner: str, alive_ms: int) -> Claim:
        """Make ``owner`` the job's running attempt, returning "run" and the job's request;
        anything but "run" means do not run it. ``queued_as`` is the arq id the job came
        under: it leaves arq's queue and the waiting set now, whatever the outcome."""
        (claimed,) = await self.claim_many([(job_id, queued_as, owner)], alive_ms)
        return claimed

    async def claim_many(
        self, attempts: Sequence[tuple[str, str, str]], alive_ms: int
    ) -> list[Claim]:
        """``claim`` for several ``(job_id, queued_as, owner)`` at once, in one round trip."""
        lapse_ms = int(time.time() * 1000) + alive_ms
        calls: list[tuple[list[str], list[bytes | str | int]]] = []
        for job_id, queued_as, owner in attempts:
            script_keys = [
                *_job_keys(job_id),
                keys.PENDING,
                keys.RUNNING,
                keys.watched_key(job_id),
                keys.QUEUE_NAME,
                job_key_prefix + queued_as,
            ]
            args: list[bytes | str | int] = [
                owner,
                alive_ms,
                ev.encode(ev.Started(job_id)),
                self._worker_lost,
                self._no_worker,
                self.retention_s,
                queued_as,
                lapse_ms,
                "get",
                self._client_gone,
            ]
            calls.append((script_keys, args))
        claimed = []
        for result in await self._scripts.run_all(CLAIM, calls):
            claimed.append((result[0].decode(), result[1] if len(result) > 1 else None))
        return claimed

    async def append(self, job_id: str, owner: str, number: int, batch: Sequence[ev.Event]) -> bool:
        """Append batch ``number`` (1, 2, ... per attempt) as ``owner``; False means this
        attempt no longer owns the job. Retrying a batch never writes it twice."""
        (appended,) = await self.append_many([(job_id, owner, number, batch)])
        if isinstance(appended, Exception):
            raise appended
        return appended

    async def append_many(
        self, batches: Sequence[tuple[str, str, int, Sequence[ev.Event]]]
    ) -> list[bool | Exception]:
        """Append the batches of many jobs in one round trip, ``(job_id, owner, number,
        events)`` each. Per batch: True, False if that attempt no longer owns its job, or
        the error Redis gave for that batch alone (the others are written)."""
        calls: list[tuple[list[str], list[bytes | str | int]]] = []
        for job_id, owner, number, batch in batches:
            args: list[bytes | str | int] = [
                owner,
                self.retention_s,
                "1" if any(isinstance(e, ev.OUTPUT_EVENTS) for e in batch) else "0",
                number,
            ]
            for event in batch:
                args += [ev.encode(event), "1" if ev.is_final(event) else "0"]
            calls.append((_job_keys(job_id), args))
        results = await self._scripts.run_many(APPEND, calls)
        return [r if isinstance(r, Exception) else bool(r) for r in results]

    async def release(self, job_id: str, owner: str) -> int:
        """Hand a job without output back to the queue, and queue it for arq again. Returns
        how often it has been handed back, 0 if it had output or was not ours, -1 if it was
        handed back too often and has now ended with an error."""
        script_keys, queue_args = self._queue_again(job_id)
        args: list[bytes | str | int] = [
            owner,
            self.queue_timeout_ms,
            MAX_REQUEUES,
            self._too_many,
            self.retention_s,
            *queue_args,
        ]
        (handed_back,) = await self._scripts.run_all(RELEASE, [(script_keys, args)])
        return int(handed_back)

    def _queue_again(self, job_id: str) -> tuple[list[str], list[bytes | str | int]]:
        """The keys, and the arguments that end them, for a script that may queue the job
        again under a fresh arq id."""
        job = arq_job(job_id)
        script_keys = [*_job_keys(job_id), job.key, keys.QUEUE_NAME, keys.PENDING, keys.WAKE]
        return script_keys, [job.arq_id, job.payload, job.enqueued_ms, keys.WAKE_CAP - 1]

    async def end(self, job_id: str, error: str) -> bool:
        """End the job now with ``error`` unless it has already ended; True if this did."""
        args: list[bytes | str | int] = [ev.encode(ev.Error(error)), self.retention_s, job_id]
        (ended,) = await self._scripts.run_all(END, [(_job_keys(job_id), args)])
        return int(ended) == 1

    async def check_stalled(self, job_ids: Sequence[str]) -> dict[str, int]:
        """Per job: 0 fine, 1 ended now (worker lost), 2 handed back and queued again (its
        worker died before any output), 3 ended now (no worker in time), 4 ended now
        (handed back too often), -1 unknown."""
        base: list[bytes | str | int] = [
            self._worker_lost,
            self._no_worker,
            self.retention_s,
            self.queue_timeout_ms,
            MAX_REQUEUES,
            self._too_many,
        ]
        calls = []
        for job_id in job_ids:
            script_keys, queue_args = self._queue_again(job_id)
            calls.append(([*script_keys, keys.WORKERS], [*base, *queue_args]))
        results = await self._scripts.run_all(CHECK, calls)
        return {job_id: int(r) for job_id, r in zip(job_ids, results, strict=True)}

    async def is_over(self, job_id: str) -> bool:
        """True once the job has its final event, or when Redis no longer knows it."""
        fields = self.redis.hmget(keys.meta_key(job_id), ["kind", "final"])
        kind, final = await fields  # type: ignore[misc]
        return kind is None or final is not None

    async def key_of(self, job_id: str) -> str | None:
        """The digest of the API key that created the job ("" without keys); None if the
        job is unknown or expired."""
        key = await self.redis.hget(keys.meta_key(job_id), "key")  # type: ignore[misc]
        return key.decode() if key is not None else None

    async def entry(self, job_id: str, entry_id: str) -> Entry | None:
        """The entry at exactly ``entry_id``, to tell whether a cursor is real and final."""
        found = await self.redis.xrange(keys.events_key(job_id), entry_id, entry_id, count=1)
        return found[0] if found else None

    async def request_of(self, job_id: str) -> bytes | None:
        """The request the job was created with (JSON), or None if it is unknown."""
        request: bytes | None = await self.redis.hget(keys.meta_key(job_id), "request")  # type: ignore[misc]
        return request

    async def entries(self, job_id: str, page: int = 512) -> AsyncIterator[Entry]:
        """Every entry of the job's stream so far, read a page at a time."""
        start = "-"
        while True:
            found: list[Entry] = await self.redis.xrange(
                keys.events_key(job_id), start, "+", count=page
            )
            for entry in found:
                yield entry
            if len(found) < page:
                return
            start = "(" + found[-1][0].decode()
