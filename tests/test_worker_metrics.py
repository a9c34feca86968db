"""A worker's metrics listener that cannot start says why, naming what to change; the worker
runs on either way (its jobs do not need it)."""

from __future__ import annotations

import logging
import socket

import pytest

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
