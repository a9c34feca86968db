"""Stops a job the moment it is ended from outside (``DELETE /chat/<job_id>``).

The event log's ``end`` script publishes the job's id on ``keys.ENDED``; the worker running
it cancels its task, which closes the upstream request, well within the contract's second.
The heartbeat's ownership check stays the backstop for a message lost while this
subscription reconnects, so the beat itself can come every few seconds rather than twice a
second (at 10,000 held streams, the beats were most of Redis's work).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys

from .heartbeat import Heartbeat

logger = logging.getLogger(__name__)

POLL_S = 1.0  # each wait for a message; the connection's socket timeout is longer


async def follow_ended_jobs(redis: Redis, heartbeat: Heartbeat) -> None:
    delay = 0.1
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(keys.ENDED)
            delay = 0.1
            while True:
                message = await pubsub.get_message(timeout=POLL_S)
                if message is not None and message["type"] == "message":
                    heartbeat.stop_ended(message["data"].decode())
        except (RedisError, OSError) as exc:
            logger.warning("cannot follow cancelled jobs (%s); the heartbeat still does", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
