"""The connection kept between round trips stays usable: after Redis restarts, and after
a round trip cut short."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.functions import Functions
from shared.held_connection import HeldConnection
from shared.redis_conn import connect

from .harness import RedisServer, wait_until_async


def closed_seen(held: HeldConnection) -> bool:
    """Whether the kept connection's reader has seen its socket closed or reset: what
    ``take`` looks at (redis-py's StreamReader; None once disconnected)."""
    reader = getattr(held._idle, "_reader", None)
    return reader is None or reader.at_eof() or reader.exception() is not None


async def xread_blocked(client: Redis, client_id: int) -> bool:
    """Whether the connection ``client_id`` is blocked in Redis (its XREAD waiting)."""
    found = await client.client_list(client_id=[str(client_id)])
    return bool(found) and "b" in found[0]["flags"]


def test_a_restart_of_redis_costs_no_failed_command(own_redis: RedisServer) -> None:
    async def main() -> None:
        client = connect(own_redis.url, socket_timeout=5)
        held = HeldConnection(client)
        try:
            assert await held.call("SET", "k", "before") == b"OK"
            own_redis.stop()
            own_redis.start()
            # The old socket's EOF reaches the loop (the stop and start above blocked it).
            await wait_until_async(lambda: closed_seen(held), 5, "the old socket's EOF")
            # The pool would have noticed the closed socket; the kept connection must too.
            assert held.dropped == 0
            assert await held.call("GET", "k") is None  # a new, empty Redis
            assert held.dropped == 1  # counted: the relay then checks its silent jobs
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_connection_with_a_reply_unread_is_not_kept_in_that_state(redis_url: str) -> None:
    async def main() -> None:
        client = connect(redis_url, socket_timeout=5)
        held = HeldConnection(client)
        try:
            conn = await held.take()
            await conn.send_packed_command(conn.pack_command("ECHO", "stale"))
            await held.give(conn, in_step=False)  # as after a round trip cut short
            assert await held.call("ECHO", "fresh") == b"fresh"
        finally:
            await client.aclose()

    asyncio.run(main())


def test_an_error_reply_keeps_the_connection_and_a_cut_round_trip_replaces_it(
    redis_url: str,
) -> None:
    async def main() -> None:
        client = connect(redis_url)  # no socket timeout: the held connection bounds calls
        held = HeldConnection(client, timeout_s=0.2)
        try:
            first = await held.call("CLIENT", "ID")
            with pytest.raises(ResponseError, match="wrong number of arguments"):
                await held.call("GET")
            assert await held.call("CLIENT", "ID") == first  # read whole: kept

            with pytest.raises(RedisTimeoutError, match=r"did not answer XREAD within 0\.2 s"):
                await held.call("XREAD", "BLOCK", 600, "STREAMS", "sg:test:held", "$")
            second = await held.call("CLIENT", "ID")
            assert second != first  # its nil reply was still to come: a new connection

            blocked = asyncio.create_task(
                held.call("XREAD", "BLOCK", 600, "STREAMS", "sg:test:held", "$")
            )

            # Cancelled mid round trip: once Redis holds the XREAD (well within the 0.2 s).
            async def xread_held() -> bool:  # or the call is over already: raised below
                return blocked.done() or await xread_blocked(client, second)

            await wait_until_async(xread_held, 5, "Redis to hold the XREAD")
            blocked.cancel()
            with pytest.raises(asyncio.CancelledError):
                await blocked

            # Redis is done with the XREAD: its nil reply sent (it would have arrived by now),
            # or its connection closed.
            async def xread_over() -> bool:
                return not await xread_blocked(client, second)

            await wait_until_async(xread_over, 5, "Redis to be done with the XREAD")
            assert await held.call("ECHO", "mine") == b"mine"
            assert await held.call("CLIENT", "ID") not in (first, second)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_server_that_accepts_but_never_answers_fails_the_call_in_time() -> None:
    # A paused Redis, or a proxy in front of one: connecting succeeds, nothing answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]

        async def main() -> float:
            client = connect(f"redis://127.0.0.1:{port}/0")
            held = HeldConnection(client, timeout_s=0.3)
            began = time.monotonic()
            try:
                with pytest.raises(RedisTimeoutError):  # not the test's own TimeoutError
                    await asyncio.wait_for(held.call("PING"), 5)  # handshake included
                return time.monotonic() - began
            finally:
                await client.aclose()

        assert asyncio.run(main()) < 2


def test_callers_waiting_for_the_library_share_one_check_and_its_failure() -> None:
    """Before the library is checked, every caller waits for it: against a Redis that does
    not answer they share one round trip's wait, not one each in turn."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]

        async def main() -> float:
            client = connect(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5)
            functions = Functions(client)
            began = time.monotonic()
            try:
                calls = [functions.call("beating", ["sg:running"], []) for _ in range(4)]
                results = await asyncio.gather(*calls, return_exceptions=True)
                assert all(isinstance(r, RedisTimeoutError) for r in results), results
                return time.monotonic() - began
            finally:
                await client.aclose()

        assert asyncio.run(main()) < 1.2  # one wait of 0.5 s; in turn, four took 2 s
