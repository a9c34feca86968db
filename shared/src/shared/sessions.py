"""Conversation memory: the turns of a session, and the rule of one job at a time.

A session holds the prompt and the final answer of each completed job, newest last, capped
at a number of turns and expiring after a retention period. History sent upstream is cut
further to the newest turns that fit a character budget, so one long answer cannot crowd
out the prompt. A lock names the job answering in the session: a second prompt while it
runs is refused (409), so two answers never interleave. A lock whose job has ended, or that
outlived its TTL, is taken over.
"""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

from . import keys

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class SessionStore:
    def __init__(
        self, redis: Redis, max_turns: int, max_chars: int, retention_s: int, lock_ttl_s: int
    ) -> None:
        self.redis = redis
        self.max_turns = max_turns
        self.max_chars = max_chars
        self.retention_s = retention_s
        self.lock_ttl_s = lock_ttl_s
        self._unlock = redis.register_script(_UNLOCK)
        self._refresh = redis.register_script(_REFRESH)

    async def history(self, session: str) -> list[dict[str, Any]]:
        """The newest turns as chat messages, within the turn and character budgets."""
        raw = await self.redis.lrange(keys.session_key(session), -self.max_turns, -1)  # type: ignore[misc]
        messages: list[dict[str, Any]] = []
        budget = self.max_chars
        for item in reversed(raw):
            turn = orjson.loads(item)
            size = len(turn["prompt"]) + len(turn["answer"])
            if size > budget:
                break
            budget -= size
            messages[:0] = [
                {"role": "user", "content": turn["prompt"]},
                {"role": "assistant", "content": turn["answer"]},
            ]
        return messages

    async def append(self, session: str, prompt: str, answer: str) -> None:
        key = keys.session_key(session)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, orjson.dumps({"prompt": prompt, "answer": answer}))
            pipe.ltrim(key, -self.max_turns, -1)
            pipe.expire(key, self.retention_s)
            await pipe.execute()

    async def lock(self, session: str, job_id: str) -> str | None:
        """Take the session for ``job_id``; returns the job holding it instead, if any."""
        key = keys.session_lock_key(session)
        if await self.redis.set(key, job_id, nx=True, ex=self.lock_ttl_s):
            return None
        holder = await self.redis.get(key)
        return holder.decode() if holder else None

    async def holder(self, session: str) -> str | None:
        """The job holding the session's lock, if any (without taking it)."""
        holder = await self.redis.get(keys.session_lock_key(session))
        return holder.decode() if holder else None

    async def take_over(self, session: str, stale_job_id: str, job_id: str) -> bool:
        """Replace a lock held by a job that has ended."""
        key = keys.session_lock_key(session)
        await self._unlock(keys=[key], args=[stale_job_id])
        return bool(await self.redis.set(key, job_id, nx=True, ex=self.lock_ttl_s))

    async def refresh(self, session: str, job_id: str) -> None:
        """Give the lock a full TTL again when a (re-)run of its job starts."""
        await self._refresh(keys=[keys.session_lock_key(session)], args=[job_id, self.lock_ttl_s])

    async def unlock(self, session: str, job_id: str) -> None:
        await self._unlock(keys=[keys.session_lock_key(session)], args=[job_id])
