"""One pooled Redis connection kept between round trips, for callers that make many (the
relay's reads, the event log's appends and claims, the heartbeat).

Checking a connection out of redis-py's asyncio pool costs more CPU than the round trip
it serves: the pool tests the socket by reading it under a zero timeout, which raises and
catches ``TimeoutError`` every time (170 against 95 µs of CPU a round trip here,
measured). A kept connection is tested only for what that check is for: whether the
server closed or reset it (Redis restarted) since its last use, seen on its reader.

The kept connection has no socket timeout of its own: one deadline bounds each round trip
instead. Under a socket timeout redis-py sends every command through ``wait_for``, a task
per command (an XREAD cost 166 µs that way, 139 without).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_CONNECT_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class NotSent(RedisConnectionError):
    """Nothing of the round trip ran (no connection could be made, or a Cluster node said
    the slot of its one command is elsewhere), so it may go to another shard without being
    done twice."""


class HeldConnection:
    def __init__(self, redis: Redis, timeout_s: float | None = None) -> None:
        """``timeout_s`` bounds each round trip whole, connecting included; by default the
        client's socket timeout."""
        self._pool = redis.connection_pool
        self._socket_timeout: float | None = self._pool.connection_kwargs.get("socket_timeout")
        self._timeout_s = timeout_s if timeout_s is not None else self._socket_timeout
        self._idle: AbstractConnection | None = None
        self.dropped = 0  # kept connections found closed by the server (a Redis restart?)

    async def take(self) -> AbstractConnection:
        """The kept connection, or one from the pool while another caller has it."""
        conn, self._idle = self._idle, None
        if conn is None:
            pooled: AbstractConnection = await self._pool.get_connection()
            return pooled
        reader = getattr(conn, "_reader", None)  # redis-py's StreamReader, None if closed
        if reader is not None and (reader.at_eof() or reader.exception() is not None):
            # Closed or reset by the server: the next command connects again.
            self.dropped += 1
            await conn.disconnect(nowait=True)
        return conn

    async def give(self, conn: AbstractConnection, in_step: bool) -> None:
        """Hand back what ``take`` gave; ``in_step`` is False when a reply may be left
        unread (an error or a cancellation mid round trip): then it is disconnected."""
        if not in_step:
            await conn.disconnect(nowait=True)  # nowait: nothing to cut short mid-cleanup
        if self._idle is None:
            conn.socket_timeout = None  # each round trip has its deadline instead
            self._idle = conn
        else:
            conn.socket_timeout = self._socket_timeout  # back as the pool made it
            await self._pool.release(conn)

    async def run(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """``commands`` written at once, their raw replies in order (no redis-py response
        callbacks); an error reply is returned in its command's place, not raised."""
        conn: AbstractConnection | None = None
        in_step = False
        try:
            async with asyncio.timeout(self._timeout_s) as deadline:
                try:  # a pooled connection is connected as it is taken, a kept one here
                    conn = await self.take()
                    if not conn.is_connected:
                        await conn.connect()  # type: ignore[no-untyped-call]
                except _CONNECT_ERRORS as exc:
                    raise NotSent(str(exc)) from exc
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:  # this command's alone, read whole
                        replies.append(exc)
                    except NotSent as exc:
                        # Another command of the round trip may have run (one before it, or
                        # after it while a slot migrates key by key): sending it to another
                        # shard could do that one twice.
                        if len(commands) > 1:
                            many = f"a round trip of {len(commands)} commands"
                            raise RedisConnectionError(
                                f"{exc}, in {many}: some may have run"
                            ) from exc
                        raise
            in_step = True
            return replies
        except TimeoutError:
            if not deadline.expired():
                raise
            answer = f"Redis did not answer {commands[0][0]} within {self._timeout_s} s"
            raise RedisTimeoutError(answer) from None
        finally:
            if conn is not None:
                await self.give(conn, in_step)

    async def call(self, *args: Any) -> Any:
        """One command, its raw reply; an error reply is raised."""
        (reply,) = await self.run([args])
        if isinstance(reply, ResponseError):
            raise reply
        return reply
