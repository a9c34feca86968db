"""Liveness, readiness and Redis outages as the gateway reports them."""

from __future__ import annotations

from pathlib import Path

import httpx

from .harness import FAST_ENV, Service, free_port


def test_healthz_and_readyz(stack, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    assert client.get(stack.gateway.url + "/healthz").status_code == 200
    assert client.get(stack.gateway.url + "/readyz").status_code == 200


def test_without_redis_health_is_200_ready_and_chat_are_503(
    logdir: Path, client: httpx.Client
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    gateway = Service("gateway", {**FAST_ENV, "REDIS_URL": dead}, logdir, free_port()).start()
    try:
        assert client.get(gateway.url + "/healthz").status_code == 200
        ready = client.get(gateway.url + "/readyz")
        assert ready.status_code == 503
        assert "Redis" in ready.json()["error"]
        for response in (
            client.get(gateway.url + "/chat", params={"prompt": "hi"}),
            client.post(gateway.url + "/chat", json={"prompt": "hi"}),
        ):
            assert response.status_code == 503
            assert response.headers["retry-after"]
            assert "Redis" in response.json()["error"]
    finally:
        gateway.stop()
