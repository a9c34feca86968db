"""uvicorn's httptools protocol, with room for a long ``GET /chat?prompt=...``.

httptools parses a request target with 16-bit offsets: past 65,535 bytes uvicorn answers a
bare plain-text 400, which cut ``GET`` prompts (the only method ``EventSource`` has) at
about 11,000 accented or 5,000 emoji characters, far below ``MAX_PROMPT_CHARS``. Here a
long target's path goes to that parser and its query is kept whole; a target longer than
any prompt within the limit needs (``max_target_bytes``) is a 414 with a JSON error, read
no further.
"""

from __future__ import annotations

import asyncio

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .inputs import max_request_bytes

PARSE_URL_MAX = 65_535  # httptools.parse_url's limit
LINGER_S = 5.0  # after a 414, how long the rest of the request is read and dropped


class _TargetTooLong(Exception):
    pass


class LongTargetHttpProtocol(HttpToolsProtocol):
    max_target_bytes = 1 << 20  # set per process by ``protocol_for``
    _refused = False  # a 414 was sent: what the client still sends is read and dropped

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self.max_target_bytes:
            self._refuse_target(
                f"the request line is over {self.max_target_bytes} bytes, more than any"
                " prompt within MAX_PROMPT_CHARS needs"
            )
            raise _TargetTooLong  # stops the parser; uvicorn's own 400 is skipped below
        super().on_url(url)

    def on_headers_complete(self) -> None:
        if len(self.url) <= PARSE_URL_MAX:
            super().on_headers_complete()
            return
        target = self.url
        path, mark, query = target.partition(b"?")
        if len(path) > PARSE_URL_MAX:
            self._refuse_target(f"the request's path is over {PARSE_URL_MAX} bytes")
            raise _TargetTooLong
        self.url = path + mark
        try:
            super().on_headers_complete()
        finally:
            self.url = target
        # The request's task has been created, not yet run: it sees the whole query.
        self.scope["query_string"] = query.partition(b"#")[0]

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # refused: the 414 went out instead
            super().send_400_response(msg)

    def _refuse_target(self, reason: str) -> None:
        self._refused = True
        if self.cycle is not None and not self.cycle.response_complete:
            # An earlier (pipelined) request's response is still being written: a 414 now
            # would land inside it. HTTP/1.1 answers in order, so close instead: the client
            # sees that response cut short, and no answer to the long request.
            self.transport.close()
            return
        body = orjson.dumps({"error": f"{reason}; send long prompts with POST /chat"})
        head = (
            b"HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(head + body)
        # Closed with the client's bytes unread, the socket would answer with a reset, and
        # the client could lose the 414: end our side, read on, close a little later.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def protocol_for(max_prompt_chars: int) -> type[LongTargetHttpProtocol]:
    """The protocol class for a gateway whose prompts may be ``max_prompt_chars`` long."""
    limit = max_request_bytes(max_prompt_chars)
    return type("GatewayHttpProtocol", (LongTargetHttpProtocol,), {"max_target_bytes": limit})
