"""Redis's clock, as a process reads it between round trips.

Every time comparison of a job's life runs on one clock, Redis's (``TIME`` inside the
functions). The few a process makes itself (is a wake-up fresh, has a queued job waited
long enough for the fallback poll, how old is the oldest queued job) use this estimate of
that clock: the local clock shifted by the offset last measured against Redis, so that
hosts whose clocks disagree still agree on a job's age.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RedisClock:
    def __init__(self, local: Callable[[], float] = time.time) -> None:
        self._local = local  # injectable: tests move time by hand
        self._offset_ms = 0.0  # Redis minus local, until measured
        self.measured = False

    def observe(self, redis_ms: int, sent_at: float, received_at: float) -> None:
        """Note Redis's time, read by a round trip between these local times (seconds):
        it was read halfway, give or take half the round trip."""
        self._offset_ms = redis_ms - (sent_at + received_at) * 500
        self.measured = True

    def observe_at_most(self, redis_ms: int, received_at: float) -> None:
        """Note Redis's time as ``observe`` does, taking it as read when the answer came:
        an estimate never ahead of Redis's clock (behind by up to the round trip), for a
        deadline that must not fall late."""
        self._offset_ms = redis_ms - received_at * 1000
        self.measured = True

    def local(self) -> float:
        return self._local()

    def now_ms(self) -> int:
        return int(self._local() * 1000 + self._offset_ms)
