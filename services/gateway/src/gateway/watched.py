"""Keeping relayed jobs marked as read: a ``GET /chat`` job that some gateway relays is not
cancelled. Every ``watched_renew_s`` one function call per thousand relayed jobs renews
their ``watched`` keys (a ``SET`` each cost the gateway ~20 µs of CPU per job and renewal).
"""

from __future__ import annotations

import asyncio

from shared.functions import Functions
from shared.timing import Timing

from .relay import Relay

BATCH = 1000  # jobs per function call


class WatchedRenewal:
    def __init__(self, relay: Relay, functions: Functions, timing: Timing) -> None:
        self.relay = relay
        self.functions = functions
        self.timing = timing

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.timing.watched_renew_s)
            if self.relay.redis_down_since is None:
                await self.renew()

    async def renew(self) -> None:
        watched = [self.relay.log.keys.watched(job_id) for job_id in self.relay.jobs]
        calls = [
            (watched[start : start + BATCH], [self.timing.watched_ms])
            for start in range(0, len(watched), BATCH)
        ]
        if calls:
            await self.functions.call_all("watch", calls)
