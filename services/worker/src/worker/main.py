"""The worker process: an arq worker that runs ``chat`` jobs.

Resources (the upstream client, the event log, the heartbeat) are made in ``on_startup`` and
carried in arq's ``ctx``. Settings are read once, in ``main``; the arq options are built
from them rather than from a ``WorkerSettings`` class, since arq reads such a class's own
``__dict__`` and the values here depend on the environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from typing import Any

import uvloop
from arq.worker import func

from shared import keys
from shared.event_log import EventLog
from shared.gc_tuning import tune_gc
from shared.logs import configure_logging
from shared.redis_conn import connect_arq
from shared.roles import Roles, load_roles
from shared.sessions import SessionStore
from shared.settings import Settings, listen_host, load_settings
from shared.tasks import cancel_and_wait

from .chat_job import chat
from .ended_jobs import follow_ended_jobs
from .heartbeat import Heartbeat
from .llm import Upstream
from .metrics import WorkerMetrics
from .pickup import PushWorker
from .publisher import Batcher
from .tools import ToolRegistry

logger = logging.getLogger(__name__)


async def on_startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    redis = ctx["redis"]
    ctx["upstream"] = Upstream(settings)
    ctx["metrics"].serve(settings.metrics_port, listen_host())
    ctx["sessions"] = SessionStore(
        redis,
        settings.session_max_turns,
        settings.session_max_chars,
        settings.session_retention_s,
        lock_ttl_s=int(settings.job_timeout_s),
    )
    ctx["event_log"] = EventLog(redis, settings.stream_retention_s, settings.queue_timeout_s)
    ctx["batcher"] = Batcher(ctx["event_log"], redis_patience_s=settings.worker_lost_timeout_s)
    heartbeat = Heartbeat(
        redis,
        interval_s=settings.heartbeat_interval_s,
        alive_ms=int(settings.alive_ttl_s * 1000),
        name=ctx["worker_name"],
    )
    ctx["heartbeat"] = heartbeat
    ctx["heartbeat_task"] = asyncio.create_task(heartbeat.run())
    ctx["ended_task"] = asyncio.create_task(follow_ended_jobs(redis, heartbeat))
    logger.info(
        "worker %s ready: LLM %s, model %s, up to %d jobs at once",
        ctx["worker_name"],
        settings.openai_base_url,
        settings.openai_model,
        settings.worker_max_jobs,
    )


async def on_shutdown(ctx: dict[str, Any]) -> None:
    await cancel_and_wait([ctx.get("heartbeat_task"), ctx.get("ended_task")])
    batcher: Batcher | None = ctx.get("batcher")
    if batcher is not None:  # the jobs have ended: nothing is left to write
        await batcher.stop()
    upstream: Upstream | None = ctx.get("upstream")
    if upstream is not None:
        await upstream.close()


def create_worker(settings: Settings, tools: ToolRegistry, roles: Roles) -> PushWorker:
    worker_name = f"{socket.gethostname()}:{os.getpid()}"
    return PushWorker(
        wake_redis_url=settings.redis_url,
        functions=[func(chat, name="chat")],
        queue_name=keys.QUEUE_NAME,
        # Our own pool rather than arq's: the same factory as every other client, so a
        # Sentinel URL (and its passwords) means the same thing everywhere.
        redis_pool=connect_arq(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=10, max_connections=64
        ),
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        ctx={
            "settings": settings,
            "worker_name": worker_name,
            "tools": tools,
            "roles": roles,
            "metrics": WorkerMetrics(),
        },
        max_jobs=settings.worker_max_jobs,
        # The fallback poll (pickup is pushed, see pickup.py); in-flight jobs are not in
        # the way of new ones up to this many.
        poll_delay=0.5,
        queue_read_limit=max(1000, settings.worker_max_jobs * 5),
        job_timeout=settings.job_timeout_s,
        # SIGTERM: stop taking jobs and let running ones finish for this long.
        job_completion_wait=int(settings.shutdown_grace_s),
        # Each worker its own health-check key: arq's default is shared by the whole queue.
        health_check_key=f"sg:worker-health:{worker_name}",
        health_check_interval=60,
    )


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        tools = ToolRegistry.from_setting(settings.tools)
    except ValueError as exc:
        sys.exit(f"Streamgate cannot start: invalid setting(s)\n  TOOLS: {exc}")
    # uvloop: a third less CPU per socket event than asyncio's own loop, on every token.
    asyncio.set_event_loop(uvloop.new_event_loop())
    worker = create_worker(settings, tools, load_roles(settings.roles_file or None))
    tune_gc()
    worker.run()


if __name__ == "__main__":
    main()
