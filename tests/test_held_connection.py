"""The connection kept between round trips stays usable: after Redis restarts, and after
a round trip cut short."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.held_connection import HeldConnection
from shared.redis_conn import connect

from .harness import RedisServer


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_a_restart_of_redis_costs_no_failed_command(own_redis: RedisServer) -> None:
    async def main() -> None:
        client = connect(own_redis.url, socket_timeout=5)
        held = HeldConnection(client)
        try:
            assert await held.call("SET", "k", "before") == b"OK"
            own_redis.stop()
            own_redis.start()
            await asyncio.sleep(0.1)  # the old socket's EOF reaches the loop
            # The pool would have noticed the closed socket; the kept connection must too.
            assert await held.call("GET", "k") is None  # a new, empty Redis
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_cancelled_round_trip_leaves_no_reply_behind(redis_url: str) -> None:
    async def main() -> None:
        client = connect(redis_url, socket_timeout=5)
        held = HeldConnection(client)
        try:
            blocked = asyncio.create_task(
                held.call("XREAD", "BLOCK", 300, "STREAMS", "sg:test:held", "$")
            )
            await asyncio.sleep(0.05)
            blocked.cancel()
            with pytest.raises(asyncio.CancelledError):
                await blocked
            await asyncio.sleep(0.4)  # the XREAD's nil reply would have arrived by now
            assert await held.call("ECHO", "mine") == b"mine"
            with pytest.raises(Exception, match="wrong number of arguments"):
                await held.call("GET")
            assert await held.call("ECHO", "still in step") == b"still in step"
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_round_trip_past_its_time_fails_and_the_next_is_in_step(redis_url: str) -> None:
    async def main() -> None:
        client = connect(redis_url)  # no socket timeout: the held connection bounds calls
        held = HeldConnection(client, timeout_s=0.2)
        try:
            with pytest.raises(RedisTimeoutError, match=r"did not answer XREAD within 0\.2 s"):
                await held.call("XREAD", "BLOCK", 600, "STREAMS", "sg:test:held", "$")
            await asyncio.sleep(0.6)  # the XREAD's nil reply would have arrived by now
            assert await held.call("ECHO", "mine") == b"mine"
        finally:
            await client.aclose()

    asyncio.run(main())
