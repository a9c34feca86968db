"""One pooled Redis connection kept between round trips, for callers that make many (the
relay's reads, the worker's appends, the heartbeat).

Checking a connection out of redis-py's asyncio pool costs more CPU than the round trip
it serves: the pool tests the socket by reading it under a zero timeout, which raises and
catches ``TimeoutError`` every time (170 against 95 µs of CPU a round trip here,
measured). A kept connection is tested only for what that check is for: whether the
server closed or reset it (Redis restarted) since its last use, seen on its reader.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


class HeldConnection:
    def __init__(self, redis: Redis, timeout_s: float | None = None) -> None:
        """``timeout_s`` bounds each ``call`` whole, connecting included, for a client made
        without a socket timeout: redis-py sends each command under ``wait_for`` when it
        has one, a task per command (and on Python 3.11 a cancellation it may lose)."""
        self._pool = redis.connection_pool
        self._idle: AbstractConnection | None = None
        self._timeout_s = timeout_s

    async def take(self) -> AbstractConnection:
        """The kept connection, or one from the pool while another caller has it."""
        conn, self._idle = self._idle, None
        if conn is None:
            pooled: AbstractConnection = await self._pool.get_connection()
            return pooled
        reader = getattr(conn, "_reader", None)  # redis-py's StreamReader, None if closed
        if reader is not None and (reader.at_eof() or reader.exception() is not None):
            # Closed or reset by the server: the next command connects again.
            await conn.disconnect(nowait=True)
        return conn

    async def give(self, conn: AbstractConnection, in_step: bool) -> None:
        """Hand back what ``take`` gave; ``in_step`` is False when a reply may be left
        unread (an error or a cancellation mid round trip): then it is disconnected."""
        if not in_step:
            await conn.disconnect(nowait=True)  # nowait: nothing to cut short mid-cleanup
        if self._idle is None:
            self._idle = conn
        else:
            await self._pool.release(conn)

    async def call(self, *args: Any) -> Any:
        """One command, its raw reply (no redis-py response callback)."""
        conn: AbstractConnection | None = None
        in_step = False
        try:
            async with asyncio.timeout(self._timeout_s) as deadline:
                conn = await self.take()
                await conn.send_packed_command(conn.pack_command(*args), check_health=False)
                try:
                    reply = await conn.read_response()
                except ResponseError:
                    in_step = True  # an error reply is read whole
                    raise
            in_step = True
            return reply
        except TimeoutError:
            if not deadline.expired():
                raise
            answer = f"Redis did not answer {args[0]} within {self._timeout_s} s"
            raise RedisTimeoutError(answer) from None
        finally:
            if conn is not None:
                await self.give(conn, in_step)
