"""The SSE response of every stream: sse-starlette's, with a send timeout that holds and a
stream slot held from the handler to the last byte.

sse-starlette bounds each event's send by ``send_timeout`` but not the send that ends the
response, so a client that took nothing kept its connection, and the bytes queued for it,
for as long as it stayed. Here every send is bounded, and a client that takes nothing for
SEND_TIMEOUT_S is dropped at once: its connection is aborted through the ``ABORT``
extension our HTTP protocol puts in the scope (a plain close would wait to flush what the
client never reads), so nothing of it is left, not even its socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import anyio
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message, Receive, Scope, Send

from .http_protocol import ABORT

logger = logging.getLogger(__name__)


class EventStream(EventSourceResponse):
    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        headers: dict[str, str],
        send_timeout_s: float,
        release: Callable[[], None],
        shutdown_event: anyio.Event,
    ) -> None:
        super().__init__(
            frames,
            headers=headers,
            ping=0,  # pings come from the reader, in order with events, never after the last
            sep="\n",
            send_timeout=None,  # bounded here, every send
            # On SIGTERM the relay closes every reader when this is set; the grace lets each
            # response end cleanly instead of being cut.
            shutdown_event=shutdown_event,
            shutdown_grace_period=2,
        )
        # sse-starlette's "Connection: keep-alive", a hop-by-hop header HTTP/1.1 implies: it
        # went out beside the server's "close" to a client that asked for one.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"connection"]
        self.send_timeout_s = send_timeout_s
        self.release = release  # gives back the stream slot taken in the handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        abort: Callable[[], None] | None = scope.get("extensions", {}).get(ABORT)
        dropped = False

        async def send_within(message: Message) -> None:
            nonlocal dropped
            if dropped:
                return
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await send(message)
            except TimeoutError:
                dropped = True
                logger.info(
                    "a client took nothing for %g s (SEND_TIMEOUT_S): dropped its stream",
                    self.send_timeout_s,
                )
                if abort is None:  # not our HTTP server: let it close the connection
                    raise SendTimeoutError from None
                abort()  # the server sees the disconnect: the stream ends, nothing is held

        try:
            await super().__call__(scope, receive, send_within)
        finally:
            self.release()
