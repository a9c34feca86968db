"""Stops a job the moment it is ended from outside (``DELETE /chat/<job_id>``).

The event log's ``end`` script publishes the job's id on ``keys.ENDED``; the worker running
it cancels its task, which closes the upstream request, well within the contract's second.
The subscription is pinged, so a connection that died silently (a host lost, an idle
connection dropped by the network) is noticed and made again. A message lost meanwhile is
caught by the job's next append (fenced) or by the heartbeat's ownership check, run at once
each time the subscription is confirmed (a worker's first included). So the beat itself
comes every few seconds rather than twice a second (at 10,000 held streams, the beats were
most of Redis's work), except while the subscription is down or refused (a Redis user
without the channel): then the beat carries cancels again, every half second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .heartbeat import Heartbeat

logger = logging.getLogger(__name__)

POLL_S = 1.0  # each wait for a message; the connection's socket timeout is longer
PING_S = 5.0  # a subscription that has not answered a ping for 3 of these is made again


async def follow_ended_jobs(redis: Redis, heartbeat: Heartbeat) -> None:
    loop = asyncio.get_running_loop()
    delay = 0.1
    failing = False
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(heartbeat.keys.ended)  # only sent: a refusal (ACL) is read below
            heard = next_ping = loop.time()
            while True:
                message = await pubsub.get_message(timeout=POLL_S)
                now = loop.time()
                if message is not None:
                    heard = now
                    if message["type"] == "message":
                        heartbeat.stop_ended(message["data"].decode())
                    elif message["type"] == "subscribe":  # confirmed: following
                        heartbeat.following(True)
                        if failing:
                            logger.info("following cancelled jobs again")
                        delay, failing = 0.1, False
                if now - heard > 3 * PING_S:
                    raise RedisConnectionError(f"no answer to a ping for {3 * PING_S:g} s")
                if now >= next_ping:
                    await pubsub.ping()
                    next_ping = now + PING_S
        except Exception as exc:  # never stop following; Redis errors are the usual cause
            if not failing:
                heartbeat.following(False)  # the beat carries cancels until this is back
                logger.warning(
                    "cannot follow cancelled jobs (%s); retrying, and the heartbeat stops"
                    " them meanwhile (a Redis user needs the channel: ACL &%s)",
                    exc,
                    heartbeat.keys.ended,
                )
            failing = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
