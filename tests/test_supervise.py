"""Background loops never die silently: a bug is logged, counted and the loop started
again; a gateway's janitor survives one (the watchdog it came from used to end, and with
it every GET stream of its gateway about 35 s later)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.janitor import Janitor
from shared import supervise as supervise_module
from shared.settings import Settings
from shared.supervise import supervise

from .harness import private_db, release_db


@pytest.fixture(autouse=True)
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervise_module, "RESTART_MIN_S", 0.01)


@pytest.mark.asyncio
async def test_a_failing_loop_is_logged_counted_and_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[int] = []
    restarts: list[str] = []
    ran_again = asyncio.Event()

    async def loop() -> None:
        runs.append(1)
        if len(runs) <= 2:
            raise RuntimeError("a bug")
        ran_again.set()
        await asyncio.sleep(3600)

    with caplog.at_level(logging.ERROR):
        task = asyncio.create_task(supervise("probe", loop, restarts.append))
        await asyncio.wait_for(ran_again.wait(), 5)
    assert restarts == ["probe", "probe"]
    assert "background loop probe failed" in caplog.text and "RuntimeError: a bug" in caplog.text
    task.cancel()  # stopping the process still stops it
    with pytest.raises(asyncio.CancelledError):
        await task


def test_the_gateways_janitor_survives_a_bug(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = Janitor.sweep

    async def flaky(self: Janitor) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug that is not Redis's")
        return await original(self)

    monkeypatch.setattr(Janitor, "sweep", flaky)
    url = private_db(redis_url)
    try:
        app = create_app(Settings(redis_url=url, worker_lost_timeout_s=0.4))  # a 0.1 s tick
        with TestClient(app) as client:
            deadline = time.monotonic() + 5
            while len(calls) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(calls) >= 3, "the janitor stopped after the bug"
            metrics = client.get("/metrics").text
            assert 'streamgate_background_restarts_total{loop="janitor"} 1.0' in metrics
    finally:
        release_db(url)
