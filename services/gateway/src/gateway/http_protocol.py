"""uvicorn's httptools protocol, holding its own against what a client may send.

The gateway faces clients directly (compose publishes it), so the limits a reverse proxy
would add are here:

- A request's head (besides its target) is capped at ``max_header_bytes`` (431), counted
  as the bytes arrive: httptools keeps a header whole until it ends, so 8 clients sending
  50 MB headers held 400 MB. A head must arrive within ``header_timeout_s`` of its first
  byte (or of the connection), a body within ``body_timeout_s`` of its head (408).
- httptools parses a request target with 16-bit offsets: past 65,535 bytes uvicorn answered
  a bare 400, which cut ``GET`` prompts (the only method ``EventSource`` has) at about 11,000
  accented characters, far below ``MAX_PROMPT_CHARS``. Here a long target's path goes to
  that parser and its query is kept whole; a target longer than any prompt within the limit
  needs (``max_target_bytes``) is a 414.
- Every refusal, a malformed request's 400 included, is a JSON error like the app's, and
  comes in order: a refused request pipelined behind others is answered once they are (a
  pipelined request's body time starts when it runs: it is not read before).
- ``scope["extensions"][ABORT]`` drops the connection with whatever is still unsent: the
  SSE response uses it on a client that takes nothing (a close would wait to flush).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared.settings import Settings

from .errors import OPENAI_PREFIX, error_body
from .inputs import max_request_bytes

logger = logging.getLogger(__name__)

ABORT = "streamgate.abort"
PARSE_URL_MAX = 65_535  # httptools.parse_url's limit
LINGER_S = 5.0  # after a refusal, how long the rest of the request is read and dropped
REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


class _Refused(Exception):
    """Raised from a parser callback: stops the parser (uvicorn's own 400 is skipped)."""


class GatewayHttpProtocol(HttpToolsProtocol):
    # Set per process by ``protocol_for``.
    max_target_bytes = 1 << 20
    max_header_bytes = 32_768
    header_timeout_s = 10.0
    body_timeout_s = 30.0

    _refused = False  # a refusal was sent: what the client still sends is read and dropped
    _in_head = True  # the next bytes belong to a request's head
    _head_bytes = 0  # bytes of the current head received so far
    _header_bytes = 0  # bytes of the current head's header lines parsed so far
    _boundary = False  # a request began or ended during the current feed
    _deferred: tuple[int, str, bool] | None = None  # a refusal waiting for earlier answers
    _target = b""  # the request line's target as far as it came, while a head arrives
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._boundary = False
        super().data_received(data)
        if self._in_head and not self._refused and not self._boundary:
            # Bytes fed while a head was in progress from start to end of the feed are all
            # head; a feed in which a request began or ended is not counted (how much of it
            # is head is unknown, and it is at most one read).
            self._head_bytes += len(data)
            if self._head_bytes - len(getattr(self, "url", b"")) > self.max_header_bytes:
                self._refuse(431, self._headers_too_large())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._boundary = True
        self._target = b""
        self._in_head = True
        self._header_bytes = 0
        self._arm(self.header_timeout_s, self._head_too_slow)
        self.scope["extensions"] = {ABORT: self.transport.abort}  # type: ignore[dict-item]

    def on_url(self, url: bytes) -> None:
        self._target += url[: 16 - len(self._target)]  # enough to tell its path's prefix
        if len(self.url) + len(url) > self.max_target_bytes:
            self._refuse(
                414,
                f"the request line is over {self.max_target_bytes} bytes, more than any"
                " prompt within MAX_PROMPT_CHARS needs; send long prompts with POST /chat",
            )
            raise _Refused
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.max_header_bytes:
            self._refuse(431, self._headers_too_large())
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._busy():
            self._disarm()  # pipelined: its body is not read before the earlier answers end
        else:
            self._arm(self.body_timeout_s, self._body_too_slow)
        if len(self.url) <= PARSE_URL_MAX:
            super().on_headers_complete()
            return
        target = self.url
        path, mark, query = target.partition(b"?")
        if len(path) > PARSE_URL_MAX:
            reason = f"the request's path is over {PARSE_URL_MAX} bytes"
            self._refuse(414, reason + "; send long prompts with POST /chat")
            raise _Refused
        self.url = path + mark
        try:
            super().on_headers_complete()
        finally:
            self.url = target
        # The request's task has been created, not yet run: it sees the whole query.
        self.scope["query_string"] = query.partition(b"#")[0]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._boundary = True
        self._target = b""
        self._disarm()
        self._in_head = True
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._deferred is not None and not self._busy():
            self._answer(*self._deferred)
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.more_body:
            # A pipelined request now runs: its body is read from now on.
            self._arm(self.body_timeout_s, self._body_too_slow)

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # refused: its own answer went out instead
            self._refuse(
                400,
                "the request is not valid HTTP/1.1 (a raw space, control character or"
                " non-ASCII byte in its request line or headers, or a malformed body?)",
                current=not self._in_head,  # in a body: the running request's own
            )

    def _headers_too_large(self) -> str:
        return f"the request's headers are over {self.max_header_bytes} bytes (MAX_HEADER_BYTES)"

    def _head_too_slow(self) -> None:
        self._refuse(408, f"the request's head did not arrive within {self.header_timeout_s:g} s")

    def _body_too_slow(self) -> None:
        reason = f"the request's body did not arrive within {self.body_timeout_s:g} s"
        self._refuse(408, reason, current=True)

    def _busy(self) -> bool:
        """Whether an earlier request is still being answered (or waits to be)."""
        cycle = self.cycle
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete)

    def _refuse(self, status: int, reason: str, current: bool = False) -> None:
        """Answer ``status`` with a JSON error and end the connection; read no more.
        ``current``: it refuses the running request (its body), else a new head."""
        self._refused = True
        self._disarm()
        logger.info("refused a request with %d: %s", status, reason)
        cycle = self.cycle
        # Its path, as far as it came: under /v1/ the answer is in the OpenAI API's shape.
        target = cycle.scope["path"].encode() if current and cycle is not None else self._target
        openai = target.startswith(OPENAI_PREFIX.encode())
        if current and cycle is not None:
            if cycle.response_started and not cycle.response_complete:
                self.transport.abort()  # its answer is under way: nothing can follow
                return
            # The app may be waiting for the body: it sees a disconnect, and its answer,
            # if it gives one, goes nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
        elif self._busy():
            # HTTP/1.1 answers in order: once the earlier requests have their answers.
            self._deferred = (status, reason, openai)
            return
        self._answer(status, reason, openai)

    def _answer(self, status: int, reason: str, openai: bool) -> None:
        self._deferred = None
        body = orjson.dumps(error_body(status, reason, openai))
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n" % (status, REASONS[status])
        head += b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        self.transport.write(head + body)
        # Closed with the client's bytes unread, the socket would answer with a reset, and
        # the client could lose the answer: end our side, read on, close a little later.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _arm(self, seconds: float, then: Any) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, then)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def protocol_for(settings: Settings) -> type[GatewayHttpProtocol]:
    """The protocol class for a gateway with these settings."""
    limits = {
        "max_target_bytes": max_request_bytes(settings.max_prompt_chars),
        "max_header_bytes": settings.max_header_bytes,
        "header_timeout_s": settings.header_timeout_s,
        "body_timeout_s": settings.body_timeout_s,
    }
    return type("GatewayHttpProtocol", (GatewayHttpProtocol,), limits)
