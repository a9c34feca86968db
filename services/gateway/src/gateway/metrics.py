"""The gateway's Prometheus metrics, in a registry of its own (one per app)."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.keys import Keys

logger = logging.getLogger(__name__)

# The classic text format every scraper reads (the library's default now names 1.0.0).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.background_restarts = Counter(
            "streamgate_background_restarts_total",
            "Background loops started again after a failure (shared/supervise.py)",
            ["loop"],
            registry=r,
        )
        self.requests = Counter(
            "streamgate_http_requests_total",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.open_streams = Gauge(
            "streamgate_open_streams", "SSE streams open on this gateway", registry=r
        )
        self.time_to_first_token = Histogram(
            "streamgate_time_to_first_token_seconds",
            "From GET /chat to the first token sent to the client",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_final = Histogram(
            "streamgate_time_to_final_event_seconds",
            "From GET /chat to the final event sent to the client",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "streamgate_tokens_relayed_total", "Token events sent to clients", registry=r
        )
        self.jobs = Counter(
            "streamgate_jobs_total",
            "Jobs by how they ended, counted by the process that wrote the final event",
            ["outcome"],
            registry=r,
        )
        self.queue_depth = Gauge("streamgate_queue_depth", "Jobs waiting for a worker", registry=r)
        self.oldest_queued = Gauge(
            "streamgate_oldest_queued_job_age_seconds",
            "How long the oldest waiting job has waited",
            registry=r,
        )


class RequestMetrics:
    """Counts every request by its route template (not its path: ids would explode it)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_count(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self.metrics.requests.labels(_route(scope), scope["method"], str(status)).inc()


def _route(scope: Scope) -> str:
    for route in scope["app"].routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "?"))
    return "unmatched"


async def metrics_endpoint(request: Request) -> Response:
    state = request.app.state.sg
    metrics: GatewayMetrics = state.metrics
    queue_timeout_ms = int(state.settings.queue_timeout_s * 1000)
    waiting = await asyncio.gather(
        *(_waiting(shard.arq, shard.log.keys, queue_timeout_ms) for shard in state.shards),
        return_exceptions=True,
    )
    # The shards that answered: the rest of the figures are still worth a scrape while a
    # Redis is down.
    answered = [w for w in waiting if not isinstance(w, BaseException)]
    if answered:
        metrics.queue_depth.set(sum(depth for depth, _ in answered))
        metrics.oldest_queued.set(max(age for _, age in answered))
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE)


async def _waiting(redis: Redis, names: Keys, queue_timeout_ms: int) -> tuple[int, float]:
    """A shard's jobs waiting for a worker, and how long (s) the oldest has waited."""
    seconds, micros = await redis.time()  # the waiting set is scored on Redis's clock
    now_ms = seconds * 1000 + micros // 1000
    # Jobs no worker started in time can never start: not waiting any more (the janitor
    # ends them and removes them).
    waiting_since = now_ms - queue_timeout_ms
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(names.pending, f"({waiting_since}", "+inf")
        pipe.zrangebyscore(names.pending, f"({waiting_since}", "+inf", 0, 1, withscores=True)
        depth, oldest = await pipe.execute()
    return depth, max(0.0, (now_ms - oldest[0][1]) / 1000) if oldest else 0.0


CHECK_OUTCOMES = {1: "worker_lost", 3: "expired", 4: "error"}


def count_check(metrics: GatewayMetrics, job_id: str, result: int) -> None:
    """Count what a ``check`` of the job did (event_log.check_stalled's results)."""
    if result in CHECK_OUTCOMES:
        metrics.jobs.labels(CHECK_OUTCOMES[result]).inc()
    elif result == 2:
        logger.warning(
            "its worker died before any output; queued to run again", extra={"job_id": job_id}
        )
