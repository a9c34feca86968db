"""Liveness and readiness: ``/healthz`` never touches Redis, ``/readyz`` asks every shard."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .state import State


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready while some shard answers a PING; the shards that do not are named (a shard
    that answers but is full still counts as ready)."""
    state: State = request.app.state.sg
    down = [shard.name for shard in await state.shards.down()]
    if len(down) == len(state.shards):
        unreachable = "Redis is unreachable" if len(down) == 1 else "no Redis shard is reachable"
        body = {"error": f"{unreachable}: {', '.join(down)}", "down": down}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ready", "shards": len(state.shards), "down": down})
