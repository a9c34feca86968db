"""``python -m bench``: start everything, run the chosen benchmark, print and record its table."""

from __future__ import annotations

import asyncio
import datetime
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from . import compare, scenarios
from .options import Options, parse
from .processes import Cluster, raise_file_limit
from .report import Table, cpu_reference, load_average, record, section
from .runner import Bench, progress


async def run(o: Options, cluster: Cluster) -> tuple[list[Table], int]:
    """The chosen benchmark's tables, and how many requests failed in it."""
    redises = [Redis.from_url(url) for url in cluster.redis_urls]
    try:
        bench = Bench(cluster, redises, o.client_procs)
        if o.scenario == "main":
            tables = await compare.run(o, bench)
        else:
            tables = await scenarios.run(o, bench)
        return tables, bench.failed_requests
    finally:
        for redis in redises:
            await redis.aclose()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    o = parse(argv)
    # SIGTERM (a CI time-out, `timeout`) unwinds like Ctrl-C, so every process is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    files = raise_file_limit()
    logdir = o.logdir or Path(tempfile.mkdtemp(prefix="streamgate-bench-"))
    cluster = Cluster(
        logdir,
        llm_delay_s=o.delay,
        workers=o.workers,
        worker_max_jobs=o.worker_max_jobs,
        shards=o.shards,
    )
    started = datetime.datetime.now(datetime.UTC)
    load = load_average()
    reference = cpu_reference()
    began = time.monotonic()
    redis = "Redis" if o.shards == 1 else f"{o.shards} Redis servers (shards)"
    progress(
        f"bench {o.key}: starting {redis}, the demo LLM, the direct relay, a gateway and"
        f" {o.workers} worker(s); logs in {logdir}; open files up to {files};"
        f" load average {load}; CPU reference {reference}"
    )
    ok = False
    try:
        cluster.start()
        tables, failed = asyncio.run(run(o, cluster))
        ok = True
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    finally:
        cluster.stop()
        if not ok:
            progress(f"failed; the services' logs are in {logdir}")
        elif failed:
            progress(f"{failed} requests failed; the services' logs are in {logdir}")
        elif o.logdir is None:
            shutil.rmtree(logdir, ignore_errors=True)
    seconds = time.monotonic() - began
    for table in tables:
        print(f"\n## {table.title}\n\n{table.markdown()}\n", flush=True)
    if o.write:
        record(o.key, section(o.key, tables, started, seconds, load, reference))
        progress(f"recorded in docs/benchmarks.md (section {o.key})")
    progress(f"done in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
