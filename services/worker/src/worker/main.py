"""The worker process: an arq worker that runs ``chat`` jobs.

Resources (the upstream client, the event log, the heartbeat) are made in ``on_startup`` and
carried in arq's ``ctx``. Settings are read once, in ``main``; the arq options are built
from them rather than from a ``WorkerSettings`` class, since arq reads such a class's own
``__dict__`` and the values here depend on the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from functools import partial
from typing import Any

import uvloop
from arq.worker import func

from shared import tool_catalog, tracing
from shared.event_log import EventLog
from shared.gc_tuning import tune_gc
from shared.logs import configure_logging
from shared.roles import Roles, load_roles
from shared.sessions import SessionStore
from shared.settings import Settings, listen_host, load_settings
from shared.shards import require_places, shard_specs
from shared.supervise import supervise
from shared.tasks import cancel_and_wait
from shared.timing import Timing

from .agent import OpenAIAgent
from .agents import Agent, load_agent
from .chat_job import chat
from .ended_jobs import follow_ended_jobs
from .heartbeat import Heartbeat
from .llm import Upstream
from .metrics import WorkerMetrics
from .pickup import PushWorker
from .publisher import Batcher
from .shards import WorkerShard, open_shards
from .tools import ToolRegistry, load_registry

logger = logging.getLogger(__name__)


async def on_startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    timing = Timing.of(settings)
    if tracing.setup("streamgate-worker"):
        logger.info("tracing: exporting spans over OTLP (OTEL_EXPORTER_OTLP_ENDPOINT)")
    shards: list[WorkerShard] = ctx["shards"]
    ctx["upstream"] = Upstream(settings)
    metrics: WorkerMetrics = ctx["metrics"]

    def alive() -> bool:  # starting counts as alive; then every heartbeat loop must run
        return all(shard.ctx["heartbeat"].ticking() for shard in shards if shard.ctx)

    metrics.serve(settings.metrics_port, listen_host(), alive)

    def restarted(name: str) -> None:
        metrics.background_restarts.labels(name).inc()

    tasks = []
    for shard in shards:
        log = EventLog(shard.pool, timing, shard.keys)
        heartbeat = Heartbeat(
            shard.pool,
            interval_s=timing.heartbeat_s,
            alive_ms=timing.alive_ms,
            name=ctx["worker_name"],
            clock=shard.clock,
            names=shard.keys,
            readers_s=timing.readers_check_s,
        )
        shard.ctx.update(
            event_log=log,
            batcher=Batcher(
                log,
                redis_patience_s=settings.worker_lost_timeout_s,
                gather_s=settings.token_gather_ms / 1000,
                gather_from=settings.gather_from_streams,
                running=heartbeat.running,
            ),
            heartbeat=heartbeat,
            sessions=SessionStore.of(log, settings),
        )
        suffix = shard.suffix
        tasks.append(asyncio.create_task(supervise(f"heartbeat{suffix}", heartbeat.run, restarted)))
        tasks.append(
            asyncio.create_task(
                supervise(
                    f"ended-jobs{suffix}",
                    partial(follow_ended_jobs, shard.pool, heartbeat),
                    restarted,
                )
            )
        )
    ctx["shard_tasks"] = tasks
    tools: ToolRegistry = ctx["tools"]
    tools.on_run = lambda name, ok: metrics.tool_calls.labels(name, "ok" if ok else "error").inc()
    await tools.start()
    await publish_tools_once(shards, ctx["worker_name"], tools)  # before any job
    ctx["catalog_task"] = asyncio.create_task(
        supervise(
            "tool-catalog", lambda: publish_tools(shards, ctx["worker_name"], tools), restarted
        )
    )
    logger.info(
        "worker %s ready: LLM %s, model %s, up to %d jobs at once, %s",
        ctx["worker_name"],
        settings.openai_base_url,
        settings.openai_model,
        settings.worker_max_jobs,
        f"jobs from {len(shards)} Redis shards" if len(shards) > 1 else "one Redis",
    )


async def on_shutdown(ctx: dict[str, Any]) -> None:
    await cancel_and_wait(ctx.get("shard_tasks", []))
    await cancel_and_wait([ctx.get("catalog_task")])
    shards: list[WorkerShard] = ctx["shards"]
    for shard in shards:
        with contextlib.suppress(Exception):
            await tool_catalog.withdraw(shard.pool, shard.keys, ctx["worker_name"])
    await ctx["tools"].close()
    for shard in shards:
        batcher: Batcher | None = shard.ctx.get("batcher")
        if batcher is not None:  # the jobs have ended: nothing is left to write
            await batcher.stop()
    upstream: Upstream | None = ctx.get("upstream")
    if upstream is not None:
        await upstream.close()
    await asyncio.to_thread(tracing.shutdown)  # what is buffered goes out


async def publish_tools_once(
    shards: list[WorkerShard], worker_name: str, tools: ToolRegistry
) -> None:
    """List this worker's tools in every shard: a gateway reads them from any."""
    for shard in shards:
        try:
            await tool_catalog.publish(shard.pool, shard.keys, worker_name, tools.describe())
        except Exception as exc:
            logger.warning("could not publish this worker's tools to %s: %s", shard.name, exc)


async def publish_tools(shards: list[WorkerShard], worker_name: str, tools: ToolRegistry) -> None:
    """Keep this worker's tools listed for the gateways (``GET /tools``): at once, when an
    MCP server's list changes, and often enough that the listing never lapses."""
    while True:
        tools.changed.clear()
        await publish_tools_once(shards, worker_name, tools)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tools.changed.wait(), tool_catalog.CATALOG_RENEW_S)


def create_worker(
    settings: Settings, tools: ToolRegistry, roles: Roles, agent: Agent, metrics: WorkerMetrics
) -> PushWorker:
    worker_name = f"{socket.gethostname()}:{os.getpid()}"
    poll_delay_s = 0.5
    specs = shard_specs(settings.redis_url)
    return PushWorker(
        # Our own pools rather than arq's: the same factory as every other client, so a
        # Sentinel URL (and its passwords) means the same thing everywhere.
        shards=open_shards(specs, wake_timeout_s=poll_delay_s + 5),
        functions=[func(chat, name="chat")],
        queue_name=specs[0].keys.queue,  # arq's health check counts it
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        ctx={
            "settings": settings,
            "worker_name": worker_name,
            "tools": tools,
            "roles": roles,
            "agent": agent,
            "metrics": metrics,
        },
        max_jobs=settings.worker_max_jobs,
        # The fallback poll (pickup is pushed, see pickup.py); in-flight jobs are not in
        # the way of new ones up to this many.
        poll_delay=poll_delay_s,
        queue_read_limit=max(1000, settings.worker_max_jobs * 5),
        job_timeout=settings.job_timeout_s,
        # SIGTERM: stop taking jobs and let running ones finish for this long.
        job_completion_wait=int(settings.shutdown_grace_s),
        health_check_key=specs[0].keys.worker_health(worker_name),  # in arq's pool's shard
        health_check_interval=60,
    )


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    metrics = WorkerMetrics()
    try:
        tools = load_registry(settings)
    except ValueError as exc:
        sys.exit(f"Streamgate cannot start: invalid setting(s)\n  {exc}")
    try:
        agent = load_agent(settings.agent) if settings.agent else None
    except ValueError as exc:
        sys.exit(f"Streamgate cannot start: invalid setting(s)\n  AGENT: {exc}")
    require_places(settings.redis_url)  # the settings are sound: now Redis
    # uvloop: a third less CPU per socket event than asyncio's own loop, on every token.
    asyncio.set_event_loop(uvloop.new_event_loop())
    roles = load_roles(settings.roles_file or None)
    builtin = OpenAIAgent(settings.max_tool_rounds, metrics)
    worker = create_worker(settings, tools, roles, agent or builtin, metrics)
    tune_gc()
    worker.run()


if __name__ == "__main__":
    main()
