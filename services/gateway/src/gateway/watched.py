"""Keeping relayed jobs marked as read: a ``GET /chat`` job that some gateway relays is not
cancelled. Every ``watched_renew_s`` one function call per thousand relayed jobs renews
their ``watched`` keys (a ``SET`` each cost the gateway ~20 µs of CPU per job and renewal),
and a job this gateway begins to relay is marked within a tick: its key may have been set
to just the grace (by ``create``, or by the gateway its last reader left), shorter than the
wait for the next renewal of all.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from shared.functions import Functions
from shared.timing import Timing

from .relay import Relay

logger = logging.getLogger(__name__)

BATCH = 1000  # jobs per function call


class WatchedRenewal:
    def __init__(self, relay: Relay, functions: Functions, timing: Timing) -> None:
        self.relay = relay
        self.functions = functions
        self.timing = timing

    async def run(self) -> None:
        step_s = min(self.timing.watch_tick_s, self.timing.grace_ms / 3000)
        loop_time = asyncio.get_running_loop().time
        all_due = loop_time() + self.timing.watched_renew_s
        failing = False  # logged once, not every step
        while True:
            until_all = all_due - loop_time()  # past due (a failure): a step, not a spin
            await asyncio.sleep(min(step_s, until_all) if until_all > 0 else step_s)
            if self.relay.redis_down_since is not None:
                continue
            joined = set(self.relay.joined)
            try:
                if loop_time() >= all_due:
                    await self.renew(list(self.relay.jobs))
                    all_due = loop_time() + self.timing.watched_renew_s
                elif joined:
                    await self.renew([job_id for job_id in joined if job_id in self.relay.jobs])
            except RedisError as exc:
                # Kept due (all of them, or the joined): the next step tries again, rather
                # than a restart putting the renewal of all a whole interval off.
                if not failing:
                    logger.warning("renewing watched keys failed: %s; retrying", exc)
                failing = True
                continue
            if failing:
                logger.info("renewing watched keys works again")
                failing = False
            self.relay.joined -= joined

    async def renew(self, job_ids: list[str]) -> None:
        watched = [self.relay.log.keys.watched(job_id) for job_id in job_ids]
        calls = [
            (watched[start : start + BATCH], [self.timing.watched_ms])
            for start in range(0, len(watched), BATCH)
        ]
        if calls:
            await self.functions.call_all("watch", calls)
