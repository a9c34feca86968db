"""Background loops never die silently: a bug is logged, counted and the loop started
again; the relay's watchdog survives one (it used to end, and with it every GET stream of
its gateway about 35 s later)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio

from gateway.metrics import GatewayMetrics
from gateway.relay import Relay
from gateway.watchdog import Watchdog
from shared import supervise as supervise_module
from shared.event_log import EventLog
from shared.settings import Settings
from shared.supervise import supervise


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


@pytest.mark.asyncio
async def test_the_relay_watchdog_survives_a_bug(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = Watchdog._check_unread

    async def flaky(self: Watchdog) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug that is not Redis's")
        await original(self)

    monkeypatch.setattr(Watchdog, "_check_unread", flaky)
    settings = Settings(redis_url=redis_url, worker_lost_timeout_s=0.4)  # a 0.1 s tick
    client = redis.asyncio.Redis.from_url(redis_url)
    blocking = redis.asyncio.Redis.from_url(redis_url)
    metrics = GatewayMetrics()
    relay = Relay(client, blocking, EventLog(client, 60, 60), settings, metrics)
    await relay.start()
    try:
        for _ in range(100):
            if len(calls) >= 3:
                break
            await asyncio.sleep(0.05)
        assert len(calls) >= 3, "the watchdog stopped after the bug"
        restarts = metrics.background_restarts.labels("relay-watch")._value.get()
        assert restarts == 1
    finally:
        await relay.stop()
        await client.aclose()
        await blocking.aclose()
