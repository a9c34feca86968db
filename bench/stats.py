"""Figures from the load generator's per-request summaries."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from shared.shards import shard_of

from .measure import percentile


@dataclass
class Summary:
    requests: int = 0
    ok: int = 0
    failed: int = 0
    closed_by_bench: int = 0
    tokens: int = 0
    token_events: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupt: int = 0
    after_final: int = 0
    ttft: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    enqueue_to_start_ms: list[int] = field(default_factory=list)
    to_queued: list[float] = field(default_factory=list)  # connect -> `queued` event received
    to_started: list[float] = field(default_factory=list)  # connect -> `started` received
    late: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    late_max: list[float] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)  # LLM sent -> client read, per token
    delay_max: list[float] = field(default_factory=list)  # per stream
    first_start: float = math.inf
    last_end: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, results: list[dict[str, Any]]) -> Summary:
        for r in results:
            self.first_start = min(self.first_start, r["t0"])
            if r["duration"] is not None:
                self.last_end = max(self.last_end, r["t0"] + r["duration"])
        for r in results:
            self.requests += 1
            if r["closed_by_bench"]:
                self.closed_by_bench += 1
            elif r["ok"]:
                self.ok += 1
            else:
                self.failed += 1
                self.errors[_error_kind(r)] += 1
            for name in ("tokens", "token_events", "lost", "duplicated", "reordered"):
                setattr(self, name, getattr(self, name) + r[name])
            self.corrupt += r["corrupt"]
            self.after_final += r["after_final"]
            if r["ttft"] is not None:
                self.ttft.append(r["ttft"])
            if r["ok"] and r["duration"] is not None:
                self.durations.append(r["duration"])
            if r["queued_ms"] is not None and r["started_ms"] is not None:
                self.enqueue_to_start_ms.append(r["started_ms"] - r["queued_ms"])
            if r["to_queued"] is not None:
                self.to_queued.append(r["to_queued"])
            if r["to_started"] is not None:
                self.to_started.append(r["to_started"])
            if "late_max" in r:
                self.late_max.append(r["late_max"])
            if "delay_max" in r:
                self.delay_max.append(r["delay_max"])
            self.late += r.get("late", ())
            self.gaps += r.get("gaps", ())
            self.delays += r.get("delays", ())
        return self

    def add_summary(self, other: Summary) -> Summary:
        """Fold another phase's figures into this one (for totals over a whole run)."""
        for name in (
            "requests",
            "ok",
            "failed",
            "closed_by_bench",
            "tokens",
            "token_events",
            "lost",
            "duplicated",
            "reordered",
            "corrupt",
            "after_final",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in (
            "ttft", "durations", "enqueue_to_start_ms", "to_queued", "to_started", "late", "gaps",
            "late_max", "delays", "delay_max",
        ):  # fmt: skip
            getattr(self, name).extend(getattr(other, name))
        self.first_start = min(self.first_start, other.first_start)
        self.last_end = max(self.last_end, other.last_end)
        self.errors.update(other.errors)
        return self

    @property
    def exact(self) -> bool:
        return not (self.lost or self.duplicated or self.reordered or self.corrupt)

    @property
    def wall(self) -> float:
        return max(0.0, self.last_end - self.first_start) if self.requests else 0.0

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.wall if self.wall > 0 else None

    def ttft_ms(self, q: float) -> float | None:
        value = percentile(self.ttft, q)
        return None if value is None else value * 1000

    def errors_text(self, limit: int = 3) -> str:
        return "; ".join(f"{n}x {kind}" for kind, n in self.errors.most_common(limit))


def by_shard(results: list[dict[str, Any]], shards: int) -> list[Summary]:
    """One summary per shard, each of the requests whose job id names it (as every gateway
    reads it). A request that never saw its ``queued`` event has no job id: it is in none."""
    split: list[list[dict[str, Any]]] = [[] for _ in range(shards)]
    for r in results:
        if r["job_id"]:
            split[shard_of(r["job_id"], shards)].append(r)
    return [Summary().add(requests) for requests in split]


def _error_kind(result: dict[str, Any]) -> str:
    error = str(result.get("error") or f"no final event (final={result.get('final')})")
    return error[:80]
