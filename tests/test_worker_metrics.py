"""A worker's metrics listener that cannot start says why, naming what to change; the worker
runs on either way (its jobs do not need it)."""

from __future__ import annotations

import logging
import socket

import httpx
import pytest
from redis.asyncio import Redis

from shared.timing import STALLED_S
from worker.heartbeat import Heartbeat
from worker.metrics import WorkerMetrics


def test_a_taken_port_names_metrics_port(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="worker.metrics"):
            WorkerMetrics().serve(port, "127.0.0.1")
    assert f"port {port} is taken; set METRICS_PORT" in caplog.text


def test_an_address_not_of_this_machine_names_host(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.metrics"):
        WorkerMetrics().serve(1, "192.0.2.1")  # TEST-NET-1: never a local address
    assert "cannot listen on HOST '192.0.2.1'" in caplog.text
    assert "METRICS_PORT" not in caplog.text


def test_healthz_says_whether_the_event_loop_still_runs_the_heartbeat() -> None:
    """Served from a thread: a worker whose event loop is stuck still answers, with 503."""
    alive = [True]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics = WorkerMetrics()
    metrics.serve(port, "127.0.0.1", lambda: alive[0])
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(base + "/healthz").json() == {"status": "ok"}
    assert "streamgate_running_jobs" in httpx.get(base + "/metrics").text
    alive[0] = False
    stuck = httpx.get(base + "/healthz")
    assert stuck.status_code == 503 and "heartbeat" in stuck.json()["error"]


def test_the_heartbeat_is_ticking_until_its_loop_stalls() -> None:
    beat = Heartbeat(Redis(), interval_s=1, alive_ms=3000, name="w")  # never connects
    assert beat.ticking()
    beat.last_tick -= STALLED_S + 1  # its loop has not begun a beat for that long
    assert not beat.ticking()
