"""Jobs whose create got no answer. A Redis that hangs (rather than refusing) may hold the
create unread and run it once it wakes, though its client was answered otherwise: a 503,
or the job placed on another shard. A POST job would then run, and be paid for, for
nobody, beside the one its client sent again. Each such job is ended, or barred if the
create has not arrived yet, as soon as its shard answers: the ``end`` sent while Redis
hangs waits in its socket beside the create, so the job is ended before a worker can
claim it.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from shared import events as ev
from shared.tasks import cancel_and_wait

from .shards import Shard

logger = logging.getLogger(__name__)

RETRY_MAX_S = 5.0  # between attempts, at most (each also waits out its own round trip)
GIVE_UP_S = 3600.0  # a shard silent this long is gone, and its queued create with it


class Unanswered:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def bar(self, shard: Shard, job_id: str, session: str | None = None) -> None:
        """End or bar ``job_id`` in ``shard`` once it answers; free ``session`` (its lock,
        held for the job) then too."""
        task = asyncio.create_task(self._bar(shard, job_id, session), name=f"bar-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        await cancel_and_wait(list(self._tasks))

    async def _bar(self, shard: Shard, job_id: str, session: str | None) -> None:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + GIVE_UP_S
        delay = 0.1
        while True:
            try:  # at once: to wait in the hung Redis beside the create
                await shard.log.end(job_id, ev.CREATE_UNANSWERED, bar=True)
                if session is not None:
                    await shard.sessions.unlock(session, job_id)
                break
            except (RedisError, OSError) as exc:
                if loop.time() >= give_up_at:
                    logger.error("job %s: %s never answered to end it: %s", job_id, shard.name, exc)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        logger.info("job %s, whose create %s did not answer, will not run", job_id, shard.name)
