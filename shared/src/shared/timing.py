"""Every timing rule of a job's life, derived from the settings in one place, each with
its reason. The contract's promises these rules keep: a dead worker's job ends (or runs
again) within ``WORKER_LOST_TIMEOUT_S``; a GET job nobody reads is cancelled after
``DISCONNECT_GRACE_S``; a job no worker starts within ``QUEUE_TIMEOUT_S`` ends; a job runs
at most ``JOB_TIMEOUT_S``; a finished job's events stay readable ``STREAM_RETENTION_S``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .settings import Settings

# Fixed rules, not settings:
MAX_REQUEUES = 3  # hand-backs of a job before any output: one that kills every worker ends
POLL_AFTER_S = 1.0  # the workers' fallback poll takes queued jobs this old: younger ones
# belong to their wake-ups, so two workers never race for one
EARLY_WITHIN_S = 1.0  # a wake-up's request is sent before its claim only this soon after
# the enqueue: an older one may belong to a job cancelled meanwhile, a request paid for
CANCEL_FALLBACK_S = 0.5  # the heartbeat's interval while cancels are not followed by
# pub/sub: its ownership check then carries them, within the contract's second
ENDED_MEMORY_S = 60.0  # a cancel heard before its job is tracked here (its claim on its
# way) is remembered this long
STALLED_S = 60.0  # a worker whose heartbeat loop has not begun a beat for this long is stuck
# (/healthz 503): above a beat's interval plus a hung Redis round trip (10 s) several times


@dataclass(frozen=True)
class Timing:
    alive_ms: int
    """A running attempt's heartbeat lapses this long after its last beat: 0.7 of
    WORKER_LOST_TIMEOUT_S, so that with one ``watch_tick_s`` (at most a quarter) for a
    gateway to notice, the job ends within the timeout."""
    watch_tick_s: float
    """How often a gateway looks at its silent jobs and the janitor sweeps: at most a
    quarter of the timeouts it enforces, and at least once a second."""
    heartbeat_s: float
    """How often a worker beats: three beats per heartbeat lifetime (one lost beat is
    survived)."""
    readers_check_s: float
    """How often a worker asks whether its GET jobs still have a reader: three times per
    disconnect grace, so that one nobody reads stops in time."""
    idle_check_after_s: float
    """How long a relayed job must have been silent before a gateway asks whether its worker
    still beats: the heartbeat of a worker that wrote its last event lapses no sooner
    than two beats after it (its last beat came at most a beat before the event); one
    beat less is a margin for events read late. A queued job's deadline bounds it too.
    The janitor ends lapsed jobs whoever reads them; this check is each gateway's own,
    and after a Redis error it looks at every silent job (Redis may have restarted
    empty)."""
    watched_renew_s: float
    """How often a gateway marks the jobs it relays as read: twice per grace. Another
    gateway's last reader leaving sets the key to just the grace, at any moment: the next
    renewal (this interval, plus a busy loop's lateness) must come before it lapses."""
    watched_ms: int
    """A renewal's lifetime: generous (a busy gateway may renew late); the grace proper
    starts when the last reader leaves, set to exactly ``grace_ms``."""
    grace_ms: int
    """DISCONNECT_GRACE_S: a GET job with no reader for this long is cancelled."""
    queue_timeout_ms: int
    """QUEUE_TIMEOUT_S: how long a job may wait for a worker, each time it is queued."""
    queued_ttl_s: int
    """Each time a job is queued (created, handed back) its keys are given this long at
    least: a wait, a whole run, the retention."""
    run_ttl_s: int
    """Each claim extends them to this at least: a whole run, a lapse being noticed, the
    retention (a job handed back several times may run long after it was created)."""
    retention_s: int
    """STREAM_RETENTION_S: a job's keys live this long after its final event."""
    session_lock_s: int
    """A session's lock outlives its job's wait and run; a lock past it is taken over."""
    redis_down_close_s: float
    """A gateway that cannot reach a job's Redis ends its streams with an error after this:
    by then its worker has given up writing too, as when a worker is lost."""
    janitor_lease_ms: int
    """The fleet-wide sweep's lease: held by one gateway, taken over by another within
    three ticks of its holder dying."""

    @classmethod
    def of(cls, settings: Settings) -> Timing:
        s = settings
        alive_s = s.worker_lost_timeout_s * 0.7
        tick = min(1.0, s.worker_lost_timeout_s / 4, s.queue_timeout_s / 4)
        run_s = s.job_timeout_s + s.worker_lost_timeout_s
        retention_s = math.ceil(s.stream_retention_s)
        return cls(
            alive_ms=int(alive_s * 1000),
            watch_tick_s=tick,
            heartbeat_s=alive_s / 3,
            readers_check_s=s.disconnect_grace_s / 3,
            idle_check_after_s=max(tick, min(alive_s / 3, s.queue_timeout_s)),
            watched_renew_s=s.disconnect_grace_s / 2,
            watched_ms=int((s.disconnect_grace_s * 3 + 5) * 1000),
            grace_ms=int(s.disconnect_grace_s * 1000),
            queue_timeout_ms=int(s.queue_timeout_s * 1000),
            queued_ttl_s=math.ceil(s.queue_timeout_s + run_s) + retention_s,
            run_ttl_s=math.ceil(run_s) + retention_s,
            retention_s=retention_s,
            session_lock_s=math.ceil(s.queue_timeout_s + run_s),
            redis_down_close_s=s.worker_lost_timeout_s,
            janitor_lease_ms=int(tick * 3 * 1000),
        )
