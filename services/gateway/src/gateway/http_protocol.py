"""uvicorn's httptools protocol, with room for a long ``GET /chat?prompt=...``.

httptools parses a request target with 16-bit offsets: past 65,535 bytes uvicorn answers a
bare plain-text 400, which cut ``GET`` prompts (the only method ``EventSource`` has) at
about 11,000 accented or 5,000 emoji characters, far below ``MAX_PROMPT_CHARS``. Here a
long target's path goes to that parser and its query is kept whole; a target longer than
any prompt within the limit needs (``max_target_bytes``) is a 414 with a JSON error, read
no further.
"""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .inputs import max_request_bytes

PARSE_URL_MAX = 65_535  # httptools.parse_url's limit


class _TargetTooLong(Exception):
    pass


class LongTargetHttpProtocol(HttpToolsProtocol):
    max_target_bytes = 1 << 20  # set per process by ``protocol_for``

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self.max_target_bytes:
            self._refuse_target()
            raise _TargetTooLong  # stops the parser; uvicorn's own 400 is skipped below
        super().on_url(url)

    def on_headers_complete(self) -> None:
        if len(self.url) <= PARSE_URL_MAX:
            super().on_headers_complete()
            return
        target = self.url
        path, mark, query = target.partition(b"?")
        if len(path) > PARSE_URL_MAX:
            self._refuse_target()
            raise _TargetTooLong
        self.url = path + mark
        try:
            super().on_headers_complete()
        finally:
            self.url = target
        # The request's task has been created, not yet run: it sees the whole query.
        self.scope["query_string"] = query.partition(b"#")[0]

    def send_400_response(self, msg: str) -> None:
        if not self.transport.is_closing():  # closed: the 414 went out instead
            super().send_400_response(msg)

    def _refuse_target(self) -> None:
        body = orjson.dumps(
            {
                "error": f"the request line is over {self.max_target_bytes} bytes, more than"
                " any prompt within MAX_PROMPT_CHARS needs; send long prompts with POST /chat"
            }
        )
        head = (
            b"HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(head + body)
        self.transport.close()


def protocol_for(max_prompt_chars: int) -> type[LongTargetHttpProtocol]:
    """The protocol class for a gateway whose prompts may be ``max_prompt_chars`` long."""
    limit = max_request_bytes(max_prompt_chars)
    return type("GatewayHttpProtocol", (LongTargetHttpProtocol,), {"max_target_bytes": limit})
