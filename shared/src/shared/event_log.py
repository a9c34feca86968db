"""The event log: the one seam over the Redis streams that carry every job's events.

Writes go through Lua scripts so that each is atomic with the job's state in its meta hash:

- ``create`` writes the ``queued`` event at enqueue, so the events URL works at once.
- ``claim`` lets a worker's attempt own the job. A job that already published output is
  never run again: the new attempt ends it with an error instead (arq may run a job twice).
- ``append`` is fenced by the owning attempt: a stale attempt, or any writer after the final
  event, writes nothing and learns it should stop.
- ``end`` is how a gateway (or a worker for another's job) ends a job from outside: cancel,
  a worker that stopped renewing its heartbeat, a queue timeout. Its checks run in the script,
  so two gateways watching one job cannot both end it.

Every job stream thus ends with exactly one final event, and nothing follows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from redis.asyncio import Redis

from . import events as ev
from . import keys

Entry = tuple[bytes, dict[bytes, bytes]]  # (stream entry id, fields) as Redis returns them
DATA = b"d"
FINAL = b"f"

_FINALIZE = """
local function finalize(data, retention)
  redis.call('XADD', KEYS[2], '*', 'd', data, 'f', '1')
  redis.call('HSET', KEYS[1], 'final', '1', 'owner', '-')
  redis.call('EXPIRE', KEYS[1], retention)
  redis.call('EXPIRE', KEYS[2], retention)
  redis.call('DEL', KEYS[3], KEYS[4])
end
"""

# KEYS: meta, events, alive, deadline, watched.
# ARGV: kind, queued event, queue timeout ms, ttl s, disconnect grace ms (0: not watched).
_CREATE = """
redis.call('HSET', KEYS[1], 'kind', ARGV[1])
local id = redis.call('XADD', KEYS[2], '*', 'd', ARGV[2])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
if ARGV[5] ~= '0' then redis.call('SET', KEYS[5], '1', 'PX', ARGV[5]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return id
"""

# ARGV: owner, alive ms, started event, worker-lost error, no-worker error, retention s.
_CLAIM = (
    _FINALIZE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
if redis.call('HEXISTS', KEYS[1], 'final') == 1 then return 'final' end
local previous = redis.call('HGET', KEYS[1], 'owner')
if not previous and redis.call('EXISTS', KEYS[4]) == 0 then
  finalize(ARGV[5], ARGV[6])
  return 'expired'
end
if redis.call('HEXISTS', KEYS[1], 'published') == 1 then
  finalize(ARGV[4], ARGV[6])
  return 'lost'
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
redis.call('DEL', KEYS[4])
if not previous then redis.call('XADD', KEYS[2], '*', 'd', ARGV[3]) end
return 'run'
"""
)

# ARGV: owner, retention s, published ('1' or '0'), then (event, final) pairs.
_APPEND = (
    _FINALIZE
    + """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'published', '1') end
for i = 4, #ARGV, 2 do
  if ARGV[i + 1] == '1' then
    finalize(ARGV[i], ARGV[2])
    return 1
  end
  redis.call('XADD', KEYS[2], '*', 'd', ARGV[i])
end
return 1
"""
)

# ARGV: mode, error event, retention s. Returns 1 if it ended the job, 0 if not, -1 if gone.
_END = (
    _FINALIZE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'final') == 1 then return 0 end
if ARGV[1] == 'stalled' then
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner then
    if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
    finalize(ARGV[2], ARGV[3])
  else
    if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
    finalize(ARGV[4], ARGV[3])
  end
  return 1
end
finalize(ARGV[2], ARGV[3])
return 1
"""
)

ClaimResult = Literal["run", "gone", "final", "expired", "lost"]


def _job_keys(job_id: str) -> list[str]:
    return [
        keys.meta_key(job_id),
        keys.events_key(job_id),
        keys.alive_key(job_id),
        keys.deadline_key(job_id),
    ]


class EventLog:
    def __init__(self, redis: Redis, retention_s: int) -> None:
        self.redis = redis
        self.retention_s = retention_s
        self._create = redis.register_script(_CREATE)
        self._claim = redis.register_script(_CLAIM)
        self._append = redis.register_script(_APPEND)
        self._end = redis.register_script(_END)

    async def create(
        self,
        job_id: str,
        kind: str,
        position: int,
        queue_timeout_s: float,
        ttl_s: int,
        watched_s: float | None,
    ) -> bytes:
        """Start the job's stream with its ``queued`` event; returns that event's entry id.

        ``watched_s`` (GET jobs): the job counts as read for this long, until a relay renews it.
        """
        queued = ev.encode(ev.Queued(job_id, position))
        watched_ms = int(watched_s * 1000) if watched_s else 0
        entry_id: bytes = await self._create(
            keys=[*_job_keys(job_id), keys.watched_key(job_id)],
            args=[kind, queued, int(queue_timeout_s * 1000), ttl_s, watched_ms],
        )
        return entry_id

    async def claim(self, job_id: str, owner: str, alive_ms: int) -> ClaimResult:
        result: bytes = await self._claim(
            keys=_job_keys(job_id),
            args=[
                owner,
                alive_ms,
                ev.encode(ev.Started(job_id)),
                ev.encode(ev.Error(ev.WORKER_LOST)),
                ev.encode(ev.Error(ev.NO_WORKER)),
                self.retention_s,
            ],
        )
        await self.redis.zrem(keys.PENDING, job_id)  # started or ended: no longer waiting
        return result.decode()  # type: ignore[return-value]

    async def append(self, job_id: str, owner: str, batch: Sequence[ev.Event]) -> bool:
        """Append events as ``owner``; False means this attempt no longer owns the job."""
        args: list[bytes | str | int] = [
            owner,
            self.retention_s,
            "1" if any(isinstance(e, ev.OUTPUT_EVENTS) for e in batch) else "0",
        ]
        for event in batch:
            args += [ev.encode(event), "1" if ev.is_final(event) else "0"]
        return bool(await self._append(keys=_job_keys(job_id), args=args))

    async def end(self, job_id: str, error: str) -> bool:
        """End the job now with ``error`` unless it has already ended; True if this did."""
        args: list[bytes | str | int] = ["now", ev.encode(ev.Error(error)), self.retention_s]
        return int(await self._end(keys=_job_keys(job_id), args=args)) == 1

    async def end_if_stalled(self, job_ids: Sequence[str]) -> dict[str, int]:
        """End each job whose worker stopped its heartbeat or that no worker started in time.

        Returns per job: 1 ended now, 0 alive (or already ended), -1 unknown (lost or expired).
        """
        lost = ev.encode(ev.Error(ev.WORKER_LOST))
        no_worker = ev.encode(ev.Error(ev.NO_WORKER))
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                await self._end(
                    keys=_job_keys(job_id),
                    args=["stalled", lost, self.retention_s, no_worker],
                    client=pipe,
                )
            results = await pipe.execute()
        return {job_id: int(r) for job_id, r in zip(job_ids, results, strict=True)}

    async def exists(self, job_id: str) -> bool:
        return bool(await self.redis.exists(keys.meta_key(job_id)))

    async def entry(self, job_id: str, entry_id: str) -> Entry | None:
        """The entry at exactly ``entry_id``, to tell whether a cursor is real and final."""
        found = await self.redis.xrange(keys.events_key(job_id), entry_id, entry_id, count=1)
        return found[0] if found else None

    async def read_after(self, job_id: str, entry_id: str, count: int = 1000) -> list[Entry]:
        """Entries after ``entry_id`` that are already written; never blocks."""
        found = await self.redis.xrange(keys.events_key(job_id), f"({entry_id}", "+", count=count)
        return list(found)
