"""Liveness and readiness: ``/healthz`` never touches Redis, ``/readyz`` must reach it."""

from __future__ import annotations

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import error_response
from .state import State


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: State = request.app.state.sg
    try:
        await state.arq.ping()
    except (RedisError, OSError):
        return error_response(503, "Redis is unreachable", retry_after=5)
    return JSONResponse({"status": "ready"})
