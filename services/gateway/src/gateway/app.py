"""The gateway's ASGI app: ``create_app(settings)`` builds it; the lifespan owns Redis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from shared import tracing
from shared.roles import load_roles
from shared.settings import Settings
from shared.supervise import supervise
from shared.tasks import cancel_and_wait
from shared.timing import Timing

from . import aisdk_chat, chat, health, openai_chat, openai_responses, usage
from .access import Access
from .cors import JsonCORSMiddleware
from .errors import (
    CATCH_ALL,
    ApiError,
    allowed_methods,
    error_response,
    handle_api_error,
    handle_redis_down,
    handle_redis_full,
)
from .idle_check import IdleCheck
from .janitor import Janitor
from .metrics import GatewayMetrics, RequestMetrics, metrics_endpoint
from .shards import close_shard, open_shards
from .state import State
from .watched import WatchedRenewal


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        # Starlette's Allow names the first route's methods only.
        allowed = ", ".join(sorted(allowed_methods(request)))
        if allowed:
            response = error_response(
                405, f"{request.method} is not allowed on {request.url.path}", request=request
            )
            response.headers["Allow"] = allowed
            return response
    if exc.status_code in (404, 405):
        return error_response(404, f"no such endpoint: {request.url.path}", request=request)
    return error_response(exc.status_code, str(exc.detail), request=request)


logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# The catch-all under /chat/ takes every method: it tells a 405 (a job URL) from a 404.
EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


# The page runs its own scripts only (no inline script, no CDN): a model's answer that
# slipped an HTML payload past the sanitizer still could not run it.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src data:; "
    "media-src 'none'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)


class PageFiles(StaticFiles):
    """The page's files, each with the page's policy (``/static/index.html`` is the page too)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = PAGE_CSP
        return response


async def _index(request: Request) -> Response:
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_CSP}
    return FileResponse(STATIC / "index.html", headers=headers)


def create_app(settings: Settings) -> Starlette:
    roles = load_roles(settings.roles_file or None)
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tracing.setup("streamgate-gateway")
        timing = Timing.of(settings)
        shards = open_shards(settings, timing, metrics)
        if len(shards) > 1:
            logger.info("Redis shards: %s", "; ".join(shard.name for shard in shards))
        restarted = metrics.background_restarts.labels
        duties: dict[str, Callable[[], Awaitable[None]]] = {}
        for shard in shards:
            await shard.relay.start()
            duties |= {
                f"relay-watched{shard.suffix}": WatchedRenewal(
                    shard.relay, shard.log.functions, timing
                ).run,
                f"relay-idle{shard.suffix}": IdleCheck(shard.relay, shard.log, metrics, timing).run,
                f"janitor{shard.suffix}": Janitor(shard.log, metrics, timing).run,
            }
        background = [
            asyncio.create_task(supervise(name, run, lambda n: restarted(n).inc()), name=name)
            for name, run in duties.items()
        ]
        access = Access(
            shards, settings.keys, settings.rate_limit_per_min, settings.max_streams_per_key
        )
        app.state.sg = State(settings, shards, roles, access, metrics)
        try:
            yield
        finally:
            await cancel_and_wait(background)
            for shard in shards:
                await close_shard(shard)
            await asyncio.to_thread(tracing.shutdown)  # what is buffered goes out

    routes = [
        Route("/chat", chat.chat_get, methods=["GET"]),
        Route("/chat", chat.chat_post, methods=["POST"]),
        Route("/chat/{job_id}/events", chat.chat_events, methods=["GET"]),
        Route("/chat/{job_id}", chat.chat_cancel, methods=["DELETE"]),
        Route("/chat/{rest:path}", chat.not_a_job, methods=EVERY_METHOD, name=CATCH_ALL),
        Route("/roles", chat.list_roles, methods=["GET"]),
        Route("/tools", chat.list_tools, methods=["GET"]),
        Route("/usage", usage.usage, methods=["GET"]),
        Route("/aisdk/chat", aisdk_chat.chat, methods=["POST"]),
        Route("/aisdk/chat/{chat_id}/stream", aisdk_chat.resume, methods=["GET"]),
        Route("/aisdk/chat/{chat_id}/stream", aisdk_chat.cancel, methods=["DELETE"]),
        Route("/v1/models", openai_chat.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", openai_chat.retrieve_model, methods=["GET"]),
        Route("/v1/chat/completions", openai_chat.chat_completions, methods=["POST"]),
        Route("/v1/responses", openai_responses.create_response, methods=["POST"]),
        Route("/v1/responses/{response_id}", openai_responses.retrieve_response, methods=["GET"]),
        Route(
            "/v1/responses/{response_id}/cancel",
            openai_responses.cancel_response,
            methods=["POST"],
        ),
        Route("/healthz", health.healthz, methods=["GET"]),
        Route("/readyz", health.readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/", _index, methods=["GET"]),
        Mount("/static", PageFiles(directory=STATIC), name="static"),
    ]
    middleware = [
        Middleware(RequestMetrics, metrics=metrics),
        Middleware(
            JsonCORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            # Any request header: browser clients send their own (the OpenAI SDK its
            # X-Stainless-*, tracing a traceparent); the origins are the gate.
            allow_headers=["*"],
            expose_headers=["Retry-After", "Streamgate-Job-Id"],
            max_age=600,
        ),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            ApiError: handle_api_error,
            RedisConnectionError: handle_redis_down,
            RedisTimeoutError: handle_redis_down,
            OutOfMemoryError: handle_redis_full,
            HTTPException: _http_error,
        },
    )
