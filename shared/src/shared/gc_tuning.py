"""Garbage collector settings for the long-running services (gateway, worker; the demo LLM
and the bench's direct relay use the same).

A full collection walks every object the collector tracks, and each open stream brings
hundreds: with 3,000 streams held, the gateway, each worker and the demo LLM paused
0.1-0.5 s per full collection (collecting nothing), and no token moved meanwhile. So
collections come later and less often, and what exists at startup (modules, the app) is
frozen out of them. Garbage in cycles lives a little longer; everything else is freed by
reference counting as before.
"""

from __future__ import annotations

import gc

# Young objects per collection (default 700), then collections of the generation below
# per collection of the next (defaults 10 and 10).
THRESHOLDS = (100_000, 50, 100)


def tune_gc() -> None:
    """Call once the process is set up, before it serves."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
