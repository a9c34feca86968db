"""The arq job that answers one chat: claim it, stream the LLM, publish, end it exactly once.

Whatever happens, the ``finally`` block publishes the one final event, with two deliberate
exceptions: an attempt that lost ownership (the job was cancelled or ended from outside,
so its final event is already written), and a worker shutting down before the job published
any output (arq runs it again elsewhere and the client sees one normal answer).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import orjson

from shared import events as ev
from shared.event_log import EventLog
from shared.settings import Settings

from .heartbeat import Heartbeat
from .llm import TextDelta, Upstream, UpstreamError
from .publisher import Fenced, Publisher

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


async def chat(ctx: dict[str, Any], job_id: str) -> str:
    settings: Settings = ctx["settings"]
    log: EventLog = ctx["event_log"]
    heartbeat: Heartbeat = ctx["heartbeat"]
    owner = f"{ctx['worker_name']}:{ctx.get('job_try', 1)}:{secrets.token_hex(4)}"

    claim = await log.claim(
        job_id, ctx.get("job_id", job_id), owner, int(settings.worker_lost_timeout_s * 1000)
    )
    if claim != "run":
        logger.info("job %s not run: %s", job_id, claim)
        return claim

    request = orjson.loads(await log.request_of(job_id) or b"{}")
    publisher = Publisher(log, job_id, owner, redis_patience_s=settings.worker_lost_timeout_s)
    final: ev.Event | None = None
    with heartbeat.track(job_id, owner, watched=request.get("kind") == "get") as running:
        try:
            await answer(ctx["upstream"], publisher, request)
            final = ev.Done()
        except UpstreamError as exc:
            final = ev.Error(str(exc))
        except Fenced:
            final = None  # ended from outside: its final event is already written
        except asyncio.CancelledError:
            if running.stop_reason == "unwatched":
                final = ev.Error(ev.CLIENT_GONE)
            elif running.stop_reason is None:
                # Shutdown or job timeout. Before any output the job goes back to the queue
                # and arq runs it again; after output a re-run would repeat text.
                if not await log.release(job_id, owner):
                    final = ev.Error("the worker stopped mid-answer; the answer is incomplete")
                raise
        except Exception:
            logger.exception("job %s failed", job_id)
            final = ev.Error("the worker failed unexpectedly; see its logs")
        finally:
            if final is not None:
                await publisher.close(final)
    # A job stopped by its heartbeat (cancelled, or no reader left) is over: returning,
    # rather than raising CancelledError, keeps arq from queueing it again.
    outcome = "done" if isinstance(final, ev.Done) else running.stop_reason or "error"
    logger.info("job %s finished: %s", job_id, outcome)
    return outcome


async def answer(upstream: Upstream, publisher: Publisher, request: dict[str, Any]) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": request["prompt"]},
    ]
    async for delta in upstream.stream(messages):
        if isinstance(delta, TextDelta):
            publisher.emit(ev.Token(delta.text))
