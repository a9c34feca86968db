"""Background loops that never die silently.

A loop that a bug ends (any exception, not only Redis's) is logged with its traceback,
counted (``on_restart``, a metric), and started again after a backoff: RESTART_MIN_S,
doubling to RESTART_MAX_S, back to the minimum once a run has lasted HEALTHY_S. Before,
the gateway's watchdog (now idle_check.py, watched.py and janitor.py) ended on the first
non-Redis exception: renewing ``watched`` stopped with it, so every GET stream on that
gateway was cancelled about 35 s later. Cancellation (the process stopping) ends the loop as always.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
HEALTHY_S = 60.0


async def supervise(
    name: str,
    loop: Callable[[], Awaitable[None]],
    on_restart: Callable[[str], None] | None = None,
) -> None:
    delay = RESTART_MIN_S
    while True:
        started = time.monotonic()
        try:
            await loop()
            logger.error("background loop %s ended; starting it again in %g s", name, delay)
        except Exception:
            logger.exception("background loop %s failed; starting it again in %g s", name, delay)
        if on_restart is not None:
            on_restart(name)
        if time.monotonic() - started >= HEALTHY_S:
            delay = RESTART_MIN_S
        await asyncio.sleep(delay)
        delay = min(delay * 2, RESTART_MAX_S)
