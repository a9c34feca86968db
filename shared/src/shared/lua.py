"""Running a Lua script many times in one round trip.

EVALSHA straight on the wire: redis-py's registered scripts, queued on a pipeline, send a
SCRIPT EXISTS first on every execute (a round trip more), and its pipeline object costs
~40 µs more CPU per round trip than writing the commands at once on one connection (84 vs
43 µs measured); a worker makes a round trip per token when tokens trickle in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from .held_connection import HeldConnection

Call = tuple[Sequence[str], Sequence[bytes | str | int]]  # a call's KEYS and ARGV


class Scripts:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._held = HeldConnection(redis)  # one round trip after another, mostly
        self._shas: dict[str, str] = {}

    async def run_many(self, script: str, calls: Sequence[Call]) -> list[Any]:
        """Run ``script`` once per ``(keys, args)``, in order, in one round trip; per call,
        its result or the error Redis gave for it alone. A Redis that does not know the
        script (new, restarted, flushed) gets it loaded and the calls it refused again."""
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.encode()).hexdigest()
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            replies = await self._held.run(
                [("EVALSHA", sha, len(calls[i][0]), *calls[i][0], *calls[i][1]) for i in todo]
            )
            for i, reply in zip(todo, replies, strict=True):
                results[i] = reply
            todo = [i for i in todo if isinstance(results[i], NoScriptError)]
            if not todo or attempt == 1:
                break
            await self.redis.script_load(script)
        return results

    async def run_all(self, script: str, calls: Sequence[Call]) -> list[Any]:
        """``run_many`` for callers that need every call to succeed: the first error raised."""
        results = await self.run_many(script, calls)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results
