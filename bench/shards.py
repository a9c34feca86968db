"""The table per shard (``--shards N``, N > 1): what each Redis carried and what it cost.

A job's shard is named by its id (``shared.shards.shard_of``), so the bench splits the
clients' requests by the job ids they saw, and reads each Redis's own ``INFO cpu`` and
``INFO commandstats`` around the phase. Each shard's µs per token is its Redis's CPU over
the tokens of its own jobs; ``1e6 / µs`` is what one Redis core would carry at that cost,
the capacity per shard a deployment is sized from. On a small shared machine Redis shares
its cores with the services and clients, so that figure is a floor, not a ceiling.
"""

from __future__ import annotations

from .measure import RedisUsage
from .report import Table, num
from .runner import Phase

HEADER = (
    "shard",
    "jobs",
    "tokens/s",
    "Redis CPU, % of a core",
    "Redis CPU µs / token",
    "capacity: tokens/s a Redis core carries (1e6 / µs)",
    "clients connected (at the end)",
    "costliest commands, µs / token",
)


def table(title: str, phase: Phase) -> Table:
    t = Table(title, header=HEADER)
    jobs = [s.requests for s in phase.by_shard]
    total_jobs = sum(jobs)
    for index, (summary, usage) in enumerate(zip(phase.by_shard, phase.redis_shards, strict=True)):
        t.add_cells(
            str(index),
            f"{summary.requests:,} ({_share(summary.requests, total_jobs)})",
            *_cost(summary.tokens, summary.tokens_per_s, usage, phase.wall),
            _top(usage, summary.tokens),
        )
    if phase.redis is not None:
        all_tokens = phase.summary.tokens
        t.add_cells(
            f"all {len(phase.by_shard)}",
            f"{total_jobs:,}",
            *_cost(all_tokens, phase.summary.tokens_per_s, phase.redis, phase.wall),
            _top(phase.redis, all_tokens),
        )
    unplaced = phase.summary.requests - total_jobs
    spread = f"{min(jobs):,} to {max(jobs):,} jobs a shard" if jobs else "no jobs"
    t.notes += [
        f"Spread: {spread}, from the shard each job id names (its first two hex digits modulo"
        f" {len(phase.by_shard)}, as the clients saw it in the `queued` event)"
        + (f"; {unplaced} request(s) saw no job id and count in no shard" if unplaced else "")
        + ".",
        "Redis CPU is each Redis's own `INFO cpu` (sys + user) around the phase; its µs per"
        " token is over the tokens of the jobs whose ids name that shard. The row `all` is"
        " every Redis's CPU over every token; its capacity is per Redis core, N shards carry"
        " N times that. Commands from `INFO commandstats` (a command a function calls counts"
        " again inside `fcall`). Clients include the bench's own connection.",
    ]
    return t


def _cost(
    tokens: int, tokens_per_s: float | None, usage: RedisUsage, wall: float
) -> tuple[str, str, str, str, str]:
    us = usage.cpu_s / tokens * 1e6 if tokens else None
    busy = usage.cpu_s / wall * 100 if wall else None
    return (
        num(tokens_per_s),
        num(busy, "{:.1f}", " %"),
        num(us, "{:.1f}"),
        num(None if not us else 1e6 / us),
        str(usage.clients),
    )


def _top(usage: RedisUsage, tokens: int, n: int = 3) -> str:
    if not tokens:
        return "—"
    return ", ".join(f"{name} {us:.1f}" for name, us, _ in usage.top(tokens, n))


def _share(part: int, whole: int) -> str:
    return f"{part / whole * 100:.0f} %" if whole else "—"
