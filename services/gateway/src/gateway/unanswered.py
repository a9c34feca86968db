"""Jobs whose create got no answer. A Redis that hangs (rather than refusing) may hold the
create unread and run it once it wakes, though its client was answered otherwise: a 503,
or the job placed on another shard. A POST job would then run, and be paid for, for
nobody, beside the one its client sent again. Each such job is ended, or barred if the
create has not arrived yet, as soon as its shard answers.

The first ``end`` goes at once, before the client is answered: sent while Redis hangs, it
waits in its socket beside the create, so the job is ended before a worker can claim it.
Should it fail (the connection itself failed: a host gone mid-network), the job waits with
the others of its shard for one loop that PINGs the shard and ends them all once it
answers; a create that arrives first may then run for the moments until it does. A
gateway that stops drops what still waits, and logs the jobs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from redis.exceptions import RedisError

from shared import events as ev
from shared.tasks import cancel_and_wait

from .shards import Shard

logger = logging.getLogger(__name__)

SEND_WAIT_S = 0.2  # for the first end to be sent (a connect and a write), not answered
RETRY_MAX_S = 5.0  # between looks at a shard that does not answer, at most
GIVE_UP_S = 3600.0  # a shard silent this long is gone, and the creates it held with it


class Unanswered:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        # Per shard (its index), the jobs still to end: job id -> (its session, since when).
        self._waiting: dict[int, dict[str, tuple[str | None, float]]] = {}

    async def bar(self, shard: Shard, job_id: str, session: str | None = None) -> None:
        """End or bar ``job_id`` in ``shard`` once it answers; free ``session`` (its lock,
        held for the job) then too. Returns once the first ``end`` is on its way (moments:
        its answer, if any, is not waited for), so that it reaches a Redis that wakes as
        the client is answered before a worker can claim the job."""
        first = self._spawn(self._first(shard, job_id, session), f"bar-{job_id}")
        await asyncio.wait({first}, timeout=SEND_WAIT_S)

    async def stop(self) -> None:
        left = [job for jobs in self._waiting.values() for job in jobs]
        if left:
            logger.warning(
                "stopping with %d jobs whose create got no answer: should their Redis wake,"
                " they may run (%s)",
                len(left),
                ", ".join(left[:20]),
            )
        await cancel_and_wait(list(self._tasks))

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _first(self, shard: Shard, job_id: str, session: str | None) -> None:
        try:
            await _end(shard, job_id, session)
        except (RedisError, OSError):
            waiting = self._waiting.setdefault(shard.index, {})
            waiting[job_id] = (session, asyncio.get_running_loop().time())
            if len(waiting) == 1:  # the shard's loop, unless one runs
                self._spawn(self._until_answered(shard, waiting), f"bar-{shard.name}")

    async def _until_answered(
        self, shard: Shard, waiting: dict[str, tuple[str | None, float]]
    ) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.1
        while waiting:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            for job_id, (_, since) in list(waiting.items()):
                if loop.time() - since > GIVE_UP_S:
                    logger.error("job %s: %s never answered to end it", job_id, shard.name)
                    del waiting[job_id]
            if not waiting or not await shard.reachable():
                continue
            for job_id, (session, _) in list(waiting.items()):
                try:
                    await _end(shard, job_id, session)
                except (RedisError, OSError):
                    break  # gone again: the next look
                del waiting[job_id]
        self._waiting.pop(shard.index, None)


async def _end(shard: Shard, job_id: str, session: str | None) -> None:
    await shard.log.end(job_id, ev.CREATE_UNANSWERED, bar=True)
    if session is not None:
        await shard.sessions.unlock(session, job_id)
    logger.info("job %s, whose create %s did not answer, will not run", job_id, shard.name)
