"""The event log: the one seam over the Redis streams that carry every job's events.

Writes go through the Redis Functions of streamgate.lua (one typed method each) so that
each is atomic with the job's state in its meta hash; docs/architecture.md draws the states:

- ``create`` writes the ``queued`` event at enqueue, so the events URL works at once.
- ``claim`` lets a worker's attempt own the job. A job that already published output is
  never run again: the new attempt ends it with an error instead (arq may run a job twice).
- ``append`` is fenced by the owning attempt: a stale attempt, or any writer after the final
  event, writes nothing and learns it should stop. A session's new turn goes with the final
  event, in the same step.
- ``release`` hands a job that produced no output back to the queue (worker shutdown).
- ``end`` ends a job from outside (a cancel); ``check_stalled`` is the gateways' (their
  idle check and janitor): it ends a job whose worker stopped its heartbeat after output,
  hands one back to the queue when its worker died before any output, and ends one that
  no worker started in time. The checks run in Redis, so two gateways watching one job
  cannot both act.
- ``due`` lists the jobs the janitor should check: lapsed heartbeats, late waits;
  ``beating`` tells which jobs' attempts still beat.

Every job stream thus ends with exactly one final event, and nothing follows it.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, cast

from arq.constants import job_key_prefix
from redis.asyncio import Redis

from . import events as ev
from .functions import Functions
from .job_queue import arq_job
from .keys import WAKE_CAP, WAKE_REQUEST_MAX, Keys
from .redis_clock import RedisClock
from .timing import MAX_REQUEUES, Timing

Entry = tuple[bytes, dict[bytes, bytes]]  # (stream entry id, fields) as Redis returns them
DATA = b"d"
FINAL = b"f"

ClaimResult = Literal["run", "busy", "gone", "final", "expired", "lost", "unwatched"]
USAGE_RETENTION_S = 400 * 86400  # a key's usage per day is kept this long after its last job


class Claim(NamedTuple):
    result: ClaimResult
    request: bytes | None = None  # the job's request, for "run"
    queued_ms: int = 0  # for "run": when it was last queued, and now (Redis's clock)
    claimed_ms: int = 0
    key: str = ""  # for "run": the digest of the job's API key ("" without keys)


@dataclass(frozen=True)
class Turn:
    """A session's new turn, written with the job's final event (sessions.py builds it)."""

    key: str  # the session's turns list
    entry: bytes
    max_turns: int
    retention_s: int


@dataclass(frozen=True)
class UsageRecord:
    """A job's token usage, counted with its final event for its key, per day and model."""

    identity: str  # the digest of the job's API key ("" without keys)
    model: str
    usage: ev.Usage | None  # None: the upstream reported none


@dataclass(frozen=True)
class Closing:
    """What is written in the same step as a job's final event."""

    turn: Turn | None = None
    usage: UsageRecord | None = None


def _figures(usage: ev.Usage | None) -> list[bytes | str | int]:
    """A job's token counts as the library's arguments take them: empty for none reported."""
    if usage is None:
        return [b"", b"", b""]
    return [usage.prompt_tokens, usage.completion_tokens, usage.total_tokens]


def _appended(result: object) -> bool | Exception:
    return result if isinstance(result, Exception) else bool(result)


def _each_result(reply: object, count: int) -> list[bool | Exception]:
    """``append_each``'s reply: per job True, False, or its own error; the call's error
    for every job if the call itself failed."""
    if isinstance(reply, Exception):
        return [reply] * count
    assert isinstance(reply, list)
    return [_appended(r) for r in reply]


def running_job(member: bytes | str) -> str:
    """The job of a running index member, ``<job id> <owner>``."""
    text = member.decode() if isinstance(member, bytes) else member
    return text.split(" ", 1)[0]


def pending_job(arq_id: bytes | str) -> str:
    """The job of a waiting set member, an arq id ``<job id>`` or ``<job id>.<hex>``."""
    text = arq_id.decode() if isinstance(arq_id, bytes) else arq_id
    return text.rpartition("}")[2].split(".", 1)[0]  # a Cluster shard's tag comes first


class EventLog:
    """One typed wrapper per job function of the library (streamgate.lua)."""

    def __init__(self, redis: Redis, timing: Timing, names: Keys | None = None) -> None:
        self.redis = redis
        self.timing = timing
        self.keys = names or Keys()  # the shard's key names
        self.functions = Functions(redis)
        self._too_many = ev.encode(ev.Error(ev.TOO_MANY_ATTEMPTS))
        self._worker_lost = ev.encode(ev.Error(ev.WORKER_LOST))
        self._no_worker = ev.encode(ev.Error(ev.NO_WORKER))
        self._client_gone = ev.encode(ev.Error(ev.CLIENT_GONE))

    def _job_keys(self, job_id: str) -> list[str]:
        """The keys every job function's KEYS start with (streamgate.lua: ``job_keys``)."""
        k = self.keys
        return [
            k.meta(job_id),
            k.events(job_id),
            k.deadline(job_id),
            k.activity,
            k.running,
        ]

    async def create(
        self,
        job_id: str,
        kind: str,
        key: str,
        request: bytes,
        watched: bool,
        max_queued: int,
        clock: RedisClock | None = None,
        answer_within_s: float = 0.0,
    ) -> int:
        """Start the job, in one round trip: its stream with the ``queued`` event, and its
        arq job, a worker woken. Returns its place in the queue, or, when ``max_queued``
        jobs already wait, minus their number (and nothing is written).

        With ``clock`` (Redis's, as the caller reads it: never ahead, read first if it has
        not been, and set right by each answer), Redis runs it only until
        ``answer_within_s`` after it was sent: past that the caller has given up waiting,
        and a Redis that hung and woke with it unread writes nothing and answers 0.

        ``watched`` (GET jobs): the job counts as read for the disconnect grace, until a
        relay renews it.
        """
        t = self.timing
        before, _, after = ev.encode(ev.Queued(job_id, 0)).rpartition(b"0")
        job = arq_job(job_id, self.keys.arq_id(job_id))
        function_keys = [
            *self._job_keys(job_id),
            self.keys.pending,
            self.keys.queue,
            self.keys.wake,
            self.keys.watched(job_id),
            job.key,
        ]
        args: list[str | bytes | int] = [
            kind,
            request,
            before,
            after,
            t.queue_timeout_ms,
            t.queued_ttl_s,
            t.grace_ms if watched else 0,
            key,
            max_queued,
            job.arq_id,
            job.payload,
            WAKE_CAP - 1,
            WAKE_REQUEST_MAX,
        ]
        if clock is not None and not clock.measured:
            clock.observe_at_most(await self.functions.redis_ms(), clock.local())
        deadline = clock.now_ms() + int(answer_within_s * 1000) if clock is not None else 0
        position, redis_ms = await self.functions.call("create", function_keys, [*args, deadline])
        if clock is not None:
            clock.observe_at_most(int(redis_ms), clock.local())
        return int(position)

    async def claim(self, job_id: str, queued_as: str, owner: str) -> Claim:
        """Make ``owner`` the job's running attempt, returning "run" and the job's request;
        anything but "run" means do not run it. ``queued_as`` is the arq id the job came
        under: it leaves arq's queue and the waiting set now, whatever the outcome."""
        (claimed,) = await self.claim_many([(job_id, queued_as, owner)])
        return claimed

    async def claim_many(self, attempts: Sequence[tuple[str, str, str]]) -> list[Claim]:
        """``claim`` for several ``(job_id, queued_as, owner)`` at once, in one round trip."""
        t = self.timing
        calls: list[tuple[list[str], list[bytes | str | int]]] = []
        for job_id, queued_as, owner in attempts:
            function_keys = [
                *self._job_keys(job_id),
                self.keys.pending,
                self.keys.queue,
                self.keys.watched(job_id),
                job_key_prefix + queued_as,
            ]
            args: list[bytes | str | int] = [
                owner,
                t.alive_ms,
                ev.encode(ev.Started(job_id)),
                self._worker_lost,
                self._no_worker,
                t.retention_s,
                queued_as,
                "1",  # a GET job needs a reader
                self._client_gone,
                t.run_ttl_s,
            ]
            calls.append((function_keys, args))
        claimed = []
        for result in await self.functions.call_all("claim", calls):
            if result[0] == b"run":
                queued_ms, claimed_ms, key = int(result[2]), int(result[3]), result[4].decode()
                claimed.append(Claim("run", result[1], queued_ms, claimed_ms, key))
            else:
                claimed.append(Claim(result[0].decode()))
        return claimed

    async def append(
        self,
        job_id: str,
        owner: str,
        number: int,
        batch: Sequence[ev.Event],
        closing: Closing | None = None,
    ) -> bool:
        """Append batch ``number`` (1, 2, ... per attempt) as ``owner``; False means this
        attempt no longer owns the job. Retrying a batch never writes it twice."""
        (appended,) = await self.append_many([(job_id, owner, number, batch, closing)])
        if isinstance(appended, Exception):
            raise appended
        return appended

    async def append_many(
        self, batches: Sequence[tuple[str, str, int, Sequence[ev.Event], Closing | None]]
    ) -> list[bool | Exception]:
        """Append the batches of many jobs in one round trip, ``(job_id, owner, number,
        events, closing)`` each; ``closing``, if any, is written with the batch's final
        event. Per batch: True, False if that attempt no longer owns its job, or the error
        Redis gave for that batch alone (the others are written)."""
        results: list[bool | Exception | None] = [None] * len(batches)
        calls: list[tuple[list[str], list[bytes | str | int]]] = []
        called: list[int] = []  # the batch of each call
        for i, (job_id, owner, number, batch, closing) in enumerate(batches):
            try:
                calls.append(self._append_call(job_id, owner, number, batch, closing))
                called.append(i)
            except (TypeError, ValueError) as exc:  # one job's bad event fails that job alone
                results[i] = exc
        # Batches without a final event go together in one call (``append_each``) when
        # there are several: a call costs Redis more than the few commands of a token.
        # A job sent twice keeps its order: only a job's one batch goes in the shared call.
        sent = Counter(batches[i][0] for i in called)
        each = [
            n
            for n, (keys, _) in enumerate(calls)
            if len(keys) == 3 and sent[batches[called[n]][0]] == 1
        ]
        named: list[tuple[str, list[str], list[bytes | str | int]]] = []
        if len(each) > 1:
            each_keys: list[str] = [self.keys.activity]
            each_args: list[bytes | str | int] = []
            for n in each:
                keys, args = calls[n]
                each_keys += keys[:2]
                each_args += [*args[:3], len(args) - 3, *args[3:]]
            named.append(("append_each", each_keys, each_args))
        else:
            each = []
        shared = set(each)
        alone = [n for n in range(len(calls)) if n not in shared]
        named += [("append", *calls[n]) for n in alone]
        replies = await self.functions.call_named(named) if named else []
        if each:
            reply = replies.pop(0)
            for n, result in zip(each, _each_result(reply, len(each)), strict=True):
                results[called[n]] = result
        for n, reply in zip(alone, replies, strict=True):
            results[called[n]] = _appended(reply)
        assert all(r is not None for r in results)  # each from its call, or unwritable
        return cast(list[bool | Exception], results)

    def _append_call(
        self,
        job_id: str,
        owner: str,
        number: int,
        batch: Sequence[ev.Event],
        closing: Closing | None,
    ) -> tuple[list[str], list[bytes | str | int]]:
        """One batch's ``append`` call; TypeError or ValueError if it cannot be sent. A
        batch without a final event goes with three keys and three arguments before its
        events (streamgate.lua says why); nothing after a final event is sent."""
        end = next((i for i, e in enumerate(batch) if ev.is_final(e)), None)
        if end is not None:
            batch = batch[: end + 1]
        published = any(isinstance(e, ev.OUTPUT_EVENTS) for e in batch)
        args: list[bytes | str | int] = [owner, number, int(published)]
        if end is None:
            k = self.keys
            function_keys = [k.meta(job_id), k.events(job_id), k.activity]
        else:
            function_keys = self._job_keys(job_id)
            args += [self.timing.retention_s, b"", 0, 0, b"", b"", b"", b"", USAGE_RETENTION_S]
            turn = closing.turn if closing is not None else None
            if turn is not None:
                function_keys.append(turn.key)
                args[4:7] = [turn.entry, turn.max_turns, turn.retention_s]
            used = closing.usage if closing is not None else None
            if used is not None:
                function_keys.append(self.keys.usage(used.identity))
                args[7:11] = [used.model, *_figures(used.usage)]
        args += [ev.encode(event) for event in batch]
        if not all(isinstance(a, bytes | str | int) for a in args):
            raise TypeError(f"job {job_id}: a batch argument Redis cannot take: {args!r:.200}")
        return function_keys, args

    async def release(self, job_id: str, owner: str) -> int:
        """Hand a job without output back to the queue, and queue it for arq again. Returns
        how often it has been handed back, 0 if it had output or was not ours, -1 if it was
        handed back too often and has now ended with an error."""
        function_keys, queue_args = self._queue_again(job_id)
        t = self.timing
        args: list[bytes | str | int] = [
            owner,
            t.queue_timeout_ms,
            MAX_REQUEUES,
            self._too_many,
            t.retention_s,
            t.queued_ttl_s,
            *queue_args,
        ]
        return int(await self.functions.call("release", function_keys, args))

    def _queue_again(self, job_id: str) -> tuple[list[str], list[bytes | str | int]]:
        """The keys, and the arguments that end them, for a function that may queue the
        job again under a fresh arq id."""
        job = arq_job(job_id, self.keys.arq_id(job_id, secrets.token_hex(4)))
        function_keys = [
            *self._job_keys(job_id),
            self.keys.pending,
            self.keys.queue,
            self.keys.wake,
            job.key,
        ]
        return function_keys, [job.arq_id, job.payload, WAKE_CAP - 1]

    async def end(self, job_id: str, error: str) -> bool:
        """End the job now with ``error`` unless it has already ended; True if this did."""
        args: list[bytes | str | int] = [
            ev.encode(ev.Error(error)),
            self.timing.retention_s,
            self.keys.ended,
        ]
        keys = [*self._job_keys(job_id), self.keys.pending]
        return int(await self.functions.call("end", keys, args)) == 1

    async def check_stalled(
        self, job_ids: Sequence[str], members: Sequence[tuple[bytes, bytes]] | None = None
    ) -> dict[str, int]:
        """Per job: 0 fine, 1 ended now (worker lost), 2 handed back and queued again (its
        worker died before any output), 3 ended now (no worker in time), 4 ended now
        (handed back too often), -1 unknown. ``members``: per job, the running index and
        waiting set members that led here (b"" for none); each leaves its index once the
        job no longer needs it there."""
        t = self.timing
        base: list[bytes | str | int] = [
            self._worker_lost,
            self._no_worker,
            t.retention_s,
            t.queue_timeout_ms,
            MAX_REQUEUES,
            self._too_many,
            t.queued_ttl_s,
        ]
        calls = []
        for i, job_id in enumerate(job_ids):
            function_keys, queue_args = self._queue_again(job_id)
            running, pending = members[i] if members is not None else (b"", b"")
            args = [*base, *queue_args, running, pending]
            calls.append(([*function_keys, self.keys.workers], args))
        results = await self.functions.call_all("check", calls)
        return {job_id: int(r) for job_id, r in zip(job_ids, results, strict=True)}

    async def count_stopped(self, job_id: str, used: UsageRecord) -> bool:
        """Count the usage of a job stopped from outside mid-answer (cancelled), once, if it
        has ended; True if this counted it."""
        function_keys = [self.keys.meta(job_id), self.keys.usage(used.identity)]
        args: list[bytes | str | int] = [used.model, USAGE_RETENTION_S, *_figures(used.usage)]
        return bool(await self.functions.call("count_stopped", function_keys, args))

    async def due(self, limit: int) -> tuple[list[bytes], list[bytes]]:
        """The janitor's work, on Redis's clock: running index members whose heartbeat
        lapsed, and waiting set members past the queue timeout, at most ``limit`` each."""
        args = [limit, self.timing.queue_timeout_ms]
        lapsed, late = await self.functions.call(
            "due", [self.keys.running, self.keys.pending], args
        )
        return list(lapsed), list(late)

    async def beating(self, job_ids: Sequence[str], batch: int = 1000) -> list[bool]:
        """Per job: whether an attempt owns it and its heartbeat has not lapsed."""
        calls: list[tuple[list[str], list[bytes | str | int]]] = [
            ([self.keys.running, *(self.keys.meta(j) for j in job_ids[i : i + batch])], [])
            for i in range(0, len(job_ids), batch)
        ]
        replies = await self.functions.call_all("beating", calls) if calls else []
        return [bool(beats) for reply in replies for beats in reply]

    async def is_over(self, job_id: str) -> bool:
        """True once the job has its final event, or when Redis no longer knows it."""
        fields = self.redis.hmget(self.keys.meta(job_id), ["kind", "final"])
        kind, final = await fields  # type: ignore[misc]
        return kind is None or final is not None

    async def key_of(self, job_id: str) -> str | None:
        """The digest of the API key that created the job ("" without keys); None if the
        job is unknown or expired."""
        key = await self.redis.hget(self.keys.meta(job_id), "key")  # type: ignore[misc]
        return key.decode() if key is not None else None

    async def entry(self, job_id: str, entry_id: str) -> Entry | None:
        """The entry at exactly ``entry_id``, to tell whether a cursor is real and final."""
        found = await self.redis.xrange(self.keys.events(job_id), entry_id, entry_id, count=1)
        return found[0] if found else None

    async def request_of(self, job_id: str) -> bytes | None:
        """The request the job was created with (JSON), or None if it is unknown."""
        request: bytes | None = await self.redis.hget(self.keys.meta(job_id), "request")  # type: ignore[misc]
        return request

    async def entries(self, job_id: str, page: int = 512) -> AsyncIterator[Entry]:
        """Every entry of the job's stream so far, read a page at a time."""
        start = "-"
        while True:
            found: list[Entry] = await self.redis.xrange(
                self.keys.events(job_id), start, "+", count=page
            )
            for entry in found:
                yield entry
            if len(found) < page:
                return
            start = "(" + found[-1][0].decode()
