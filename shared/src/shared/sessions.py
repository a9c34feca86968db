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

from .event_log import EventLog, Turn
from .settings import Settings


class SessionStore:
    def __init__(
        self, log: EventLog, max_turns: int, max_chars: int, retention_s: int, lock_ttl_s: int
    ) -> None:
        """Sessions in ``log``'s shard (the one their names hash to)."""
        self.redis = log.redis
        self.keys = log.keys
        self.max_turns = max_turns
        self.max_chars = max_chars
        self.retention_s = retention_s
        self.lock_ttl_s = lock_ttl_s
        self._functions = log.functions

    @classmethod
    def of(cls, log: EventLog, settings: Settings) -> SessionStore:
        """The store the settings describe, in ``log``'s shard."""
        return cls(
            log,
            settings.session_max_turns,
            settings.session_max_chars,
            settings.session_retention_s,
            lock_ttl_s=log.timing.session_lock_s,
        )

    async def history(self, session: str) -> list[dict[str, Any]]:
        """The newest turns as chat messages, within the turn and character budgets."""
        raw = await self.redis.lrange(self.keys.session(session), -self.max_turns, -1)  # type: ignore[misc]
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

    def turn(self, session: str, prompt: str, answer: str) -> Turn:
        """A completed turn, for the event log to write with the job's final event: memory
        then never holds a turn whose answer the client saw fail."""
        entry = orjson.dumps({"prompt": prompt, "answer": answer})
        return Turn(self.keys.session(session), entry, self.max_turns, self.retention_s)

    async def lock(self, session: str, job_id: str) -> str | None:
        """Take the session for ``job_id``; returns the job holding it instead, if any."""
        key = self.keys.session_lock(session)
        if await self.redis.set(key, job_id, nx=True, ex=self.lock_ttl_s):
            return None
        holder = await self.redis.get(key)
        return holder.decode() if holder else None

    async def holder(self, session: str) -> str | None:
        """The job holding the session's lock, if any (without taking it)."""
        holder = await self.redis.get(self.keys.session_lock(session))
        return holder.decode() if holder else None

    async def take_over(self, session: str, stale_job_id: str, job_id: str) -> bool:
        """Replace a lock held by a job that has ended."""
        key = self.keys.session_lock(session)
        await self._functions.call("unlock", [key, self.keys.meta(stale_job_id)], [stale_job_id])
        return bool(await self.redis.set(key, job_id, nx=True, ex=self.lock_ttl_s))

    async def refresh(self, session: str, job_id: str) -> None:
        """Give the lock a full TTL again when a (re-)run of its job starts."""
        await self._functions.call(
            "refresh", [self.keys.session_lock(session)], [job_id, self.lock_ttl_s]
        )

    async def unlock(self, session: str, job_id: str) -> None:
        lock = self.keys.session_lock(session)
        await self._functions.call("unlock", [lock, self.keys.meta(job_id)], [job_id])
