"""A client that accepts no bytes is let go after SEND_TIMEOUT_S, and nothing of its job's
stream is held for it (it resumes from its cursor, on any gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from sse_starlette.sse import SendTimeoutError

from gateway.app import create_app
from shared.settings import Settings

from .harness import private_db, release_db


def test_a_client_that_accepts_no_bytes_is_let_go(redis_url: str) -> None:
    url = private_db(redis_url)
    settings = Settings(redis_url=url, send_timeout_s=0.5)  # no worker: the job stays queued
    app = create_app(settings)
    started: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.append(message)
        elif message.get("body"):
            await asyncio.Event().wait()  # the client's window stays shut

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # nor does it hang up
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/chat",
        "raw_path": b"/chat",
        "query_string": b"prompt=hello",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def main() -> float:
        async with app.router.lifespan_context(app):
            (shard,) = app.state.sg.shards.all
            relay = shard.relay
            began = time.monotonic()
            # sse-starlette ends it with SendTimeoutError; uvicorn then closes the connection.
            with contextlib.suppress(SendTimeoutError):
                await asyncio.wait_for(app(scope, receive, send), 10)
            took = time.monotonic() - began
            assert relay.open_readers == 0
            return took

    try:
        took = asyncio.run(main())
    finally:
        release_db(url)
    assert started and started[0]["status"] == 200
    assert took < 3
