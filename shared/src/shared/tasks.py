"""Stopping background tasks for sure.

A cancellation can be lost: on Python 3.11, redis-py's ``asyncio.timeout`` around a reply
swallows a ``cancel()`` that lands as the reply arrives (1 cancel in 20 of an ``XREAD``
loop with data flowing, measured). The loop then goes on as if never told, and whoever
awaits it (a lifespan shutdown, ``asyncio.run``'s final cleanup) waits forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

RETRY_S = 0.01


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel ``tasks`` and return once all have ended, cancelling again any that go on."""
    pending = {task for task in tasks if task is not None and not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RETRY_S)
