"""A smoke run of the benchmark harness (``python -m bench --quick``), so bench/ cannot rot.

The figures of so small a run mean nothing; what it proves is that every process starts,
both targets are driven, the table is printed and no token was lost on the way.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from .harness import ROOT


def _row(table: str, metric: str) -> list[str]:
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith(metric):
            return cells
    raise AssertionError(f"no row {metric!r} in:\n{table}")


def _quick_bench(*args: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-write", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0, f"bench failed:\n{run.stderr[-4000:]}"
    return run


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the bench starts redis-server")
def test_quick_bench_prints_a_table_with_every_token_delivered() -> None:
    run = _quick_bench()
    table = run.stdout
    assert "| metric | direct relay | Streamgate |" in table
    _, direct, streamgate, *_ = _row(table, "tokens lost / duplicated / reordered")
    assert (direct, streamgate) == ("0 / 0 / 0", "0 / 0 / 0"), table
    _, direct, streamgate, *_ = _row(table, "requests failed")
    assert direct.startswith("0 of ") and streamgate.startswith("0 of "), table
    _, direct, streamgate, *_ = _row(table, "time to first token p50, 1 client")
    assert direct.endswith(" ms") and streamgate.endswith(" ms"), table
    assert "[" in run.stderr, "no progress lines on stderr"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the bench starts redis-server")
def test_quick_paced_bench_measures_each_tokens_delay_after_the_llm() -> None:
    """paced200's tokens carry the demo LLM's send time ([stamp]): the table gives the
    delay from the LLM's write to the client's read, for both targets."""
    table = _quick_bench("--scenario", "paced200").stdout
    _, direct, streamgate, *_ = _row(table, "tokens lost / duplicated / reordered")
    assert (direct, streamgate) == ("0 / 0 / 0", "0 / 0 / 0"), table
    for metric in ("delay LLM sent → client read p50", "delay LLM sent → client read p100"):
        _, direct, streamgate, *_ = _row(table, metric)
        for cell in (direct, streamgate):
            assert cell.endswith(" ms") and 0 <= float(cell.split()[0]) < 5000, table


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the bench starts redis-server")
def test_quick_bench_with_shards_reports_each_redis() -> None:
    """``--shards 2`` starts two Redis servers, both in REDIS_URL: every job lands in one of
    them, in turn, and the per-shard table gives each one's jobs and Redis CPU per token."""
    table = _quick_bench("--scenario", "paced200", "--shards", "2").stdout
    _, direct, streamgate, *_ = _row(table, "tokens lost / duplicated / reordered")
    assert (direct, streamgate) == ("0 / 0 / 0", "0 / 0 / 0"), table
    per_shard = table[table.index("per shard (2)") :]
    jobs = [int(_row(per_shard, shard)[1].split()[0]) for shard in ("0", "1")]
    # 20 streams, the gateway's turn goes round (a shard slow to connect passes one on).
    assert sum(jobs) == 20 and abs(jobs[0] - jobs[1]) <= 2, per_shard
    for shard in ("0", "1", "all 2"):
        us_per_token = _row(per_shard, shard)[4]
        assert float(us_per_token) > 0, per_shard
