"""Starlette's CORS middleware, with a refused preflight answered like every other request
error: a JSON ``{"error": ...}`` saying what was refused, not plain ``Disallowed CORS ...``."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from .errors import error_response

_KEEP = ("access-control-", "vary")  # the preflight headers Starlette set; not the body's


class JsonCORSMiddleware(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        origin = request_headers.get("origin", "")
        refusal = error_response(
            400,
            f"CORS preflight refused: {refused} not allowed (origin {origin!r}; the gateway's"
            " CORS_ALLOW_ORIGINS lists the origins it serves)",
        )
        for name, value in response.headers.items():
            if name.lower().startswith(_KEEP):
                refusal.headers[name] = value
        return refusal
