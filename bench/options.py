"""Command-line options, with the ``--quick`` preset and each scenario's defaults."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from shared.cursors import MAX_SHARDS

T = TypeVar("T")

SCENARIOS = ("main", "concurrency1000", "hold10k", "paced200")


@dataclass
class Options:
    scenario: str
    quick: bool
    write: bool
    targets: list[str]
    clients: list[int]
    tokens: int
    delay: float
    samples: int
    rounds: int
    hold: int
    hold_delay: float
    sat_clients: int
    sat_seconds: float
    sat_tokens: int
    idle_seconds: float
    streams: int
    workers: int
    worker_max_jobs: int
    client_procs: int
    ramp: float
    timeout: float
    logdir: Path | None
    shards: int = 1

    @property
    def key(self) -> str:
        """The section of docs/benchmarks.md this run updates."""
        key = f"{self.scenario}-quick" if self.quick else self.scenario
        return key if self.shards == 1 else f"{key}-shards{self.shards}"


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _shards(text: str) -> int:
    count = int(text)
    if not 1 <= count <= MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"--shards must be 1 to {MAX_SHARDS}, not {count}")
    return count


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Start Redis, the demo LLM, a direct relay and Streamgate on free ports, drive both"
            " with the same SSE clients, print one markdown table and record it in"
            " docs/benchmarks.md."
        ),
    )
    p.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="main",
        help="main: the comparison table; the others: issue 4's larger figures",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run with tiny numbers (< 30 s)")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument(
        "--targets",
        default=None,
        help="which to drive: direct, streamgate or both (default; hold10k: streamgate)",
    )
    p.add_argument(
        "--clients",
        type=_ints,
        default=None,
        help="concurrency levels for time to first token (default 1,20,200)",
    )
    p.add_argument("--tokens", type=int, default=None, help="tokens per answer (default 50)")
    p.add_argument(
        "--delay", type=float, default=None, help="seconds between upstream tokens (default 0.02)"
    )
    p.add_argument(
        "--samples", type=int, default=None, help="sequential requests at one client (default 40)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="requests per client at higher concurrency (default 3)",
    )
    p.add_argument(
        "--hold",
        type=int,
        default=None,
        help="open streams for the RSS per stream figure (default 1000)",
    )
    p.add_argument(
        "--hold-delay",
        type=float,
        default=None,
        help="seconds between tokens on held streams (default 1)",
    )
    p.add_argument(
        "--sat-clients", type=int, default=None, help="clients at saturation (default 100)"
    )
    p.add_argument(
        "--sat-seconds",
        type=float,
        default=None,
        help="how long saturation load starts requests (default 10)",
    )
    p.add_argument(
        "--sat-tokens",
        type=int,
        default=None,
        help="tokens per answer at saturation, sent back to back (default 500)",
    )
    p.add_argument(
        "--idle-seconds", type=float, default=None, help="how long idle CPU is measured (default 5)"
    )
    p.add_argument(
        "--streams",
        type=int,
        default=None,
        help="streams for a scenario (1000, 10000, 200 by scenario)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default 1; hold10k: one per 3,400 streams)",
    )
    p.add_argument(
        "--worker-max-jobs",
        type=int,
        default=None,
        help="WORKER_MAX_JOBS (default: enough for every held stream at once, at least 200)",
    )
    p.add_argument(
        "--client-procs",
        type=int,
        default=None,
        help="load generator processes (default 2; hold10k 4)",
    )
    p.add_argument(
        "--ramp",
        type=float,
        default=None,
        help="streams opened per second when holding many (default 500)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds one request may take before it counts as lost (default 120)",
    )
    p.add_argument(
        "--shards",
        type=_shards,
        default=1,
        help="Redis servers to start, all in REDIS_URL; > 1 adds a table per shard (default 1)",
    )
    p.add_argument(
        "--logdir",
        type=Path,
        default=None,
        help="keep the services' logs here (default: a temporary directory)",
    )
    return p


def parse(argv: list[str] | None = None) -> Options:
    a = parser().parse_args(argv)
    quick: bool = a.quick
    scenario: str = a.scenario

    def pick(value: T | None, full: T, small: T) -> T:
        return value if value is not None else (small if quick else full)

    full_streams = {"main": 0, "concurrency1000": 1000, "hold10k": 10000, "paced200": 200}
    quick_streams = {"main": 0, "concurrency1000": 50, "hold10k": 100, "paced200": 20}
    streams = pick(a.streams, full_streams[scenario], quick_streams[scenario])
    workers = 1 if scenario == "paced200" else a.workers
    if workers is None:
        # Fewer, fuller workers coalesce more writes per Redis round trip: at 10,000 held
        # streams, 12 workers spent twice the CPU per token of 3.
        workers = math.ceil(streams / 3400) if scenario == "hold10k" else 1
    hold = pick(a.hold, 1000, 20)
    max_jobs = a.worker_max_jobs
    if max_jobs is None:
        # Every held stream (or every stream of a scenario) runs at once: worker capacity is
        # not what these measure, and a job left waiting would time out in the queue.
        at_once = hold if scenario == "main" else streams
        max_jobs = max(200, math.ceil(at_once / workers) + 10)
    holding = scenario == "hold10k"
    # The direct relay cannot hold thousands of streams here (httpx's pool scans every
    # connection per request), so hold10k measures Streamgate alone unless asked.
    targets: str = a.targets or ("streamgate" if holding else "direct,streamgate")
    return Options(
        scenario=scenario,
        quick=quick,
        write=not a.no_write,
        targets=[t.strip() for t in targets.split(",") if t.strip()],
        clients=pick(a.clients, [1, 20, 200], [1, 10]),
        tokens=pick(a.tokens, 120 if holding else 50, 10 if holding else 20),
        delay=pick(a.delay, 1.0 if holding else 0.02, 0.2 if holding else 0.005),
        samples=pick(a.samples, 40, 5),
        rounds=pick(a.rounds, 3, 1),
        hold=hold,
        hold_delay=pick(a.hold_delay, 1.0, 0.2),
        sat_clients=pick(a.sat_clients, 100, 5),
        sat_seconds=pick(a.sat_seconds, 10.0, 1.0),
        sat_tokens=pick(a.sat_tokens, 500, 100),
        idle_seconds=pick(a.idle_seconds, 5.0, 1.0),
        streams=streams,
        workers=workers,
        worker_max_jobs=max_jobs,
        client_procs=pick(a.client_procs, 4 if holding else 2, 1),
        ramp=pick(a.ramp, 500.0, 200.0),
        timeout=pick(a.timeout, 120.0, 20.0),
        logdir=a.logdir,
        shards=a.shards,
    )
