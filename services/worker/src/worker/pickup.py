"""Event-driven job pickup on top of arq, which only polls, and a lean start of each job.

arq's worker polls its queue every ``poll_delay`` and, on each poll, re-checks every job
still in the queue, those running included (~4 round trips each); each job it starts then
costs two more round trips (arq's in-progress mark, then its job record and retry count)
before our own claim. Here:

- An idle worker blocks on the ``WAKE`` list, to which each new job's arq id is pushed when
  it is enqueued (oldest first, several at once when it has room for them). arq's full
  poll still runs every ``poll_delay`` as a fallback (a lost wake-up, a hand-back).
- The event log's claim takes the job off arq's queue in the same script that makes this
  worker its owner and writes ``started``: one round trip from wake-up to the LLM request.
  A job running is then in the gateways' watchdog's hands (its heartbeat), not arq's, so
  arq's in-progress key, retry count and result are not kept: a job handed back is queued
  again under a fresh arq id, and one whose worker died is re-queued or ended by the
  watchdog, never run twice by arq.
- The loop rides out Redis outages instead of exiting, so a worker needs no restart when
  Redis comes back.

arq still runs the fallback poll, its health check and the graceful shutdown (it stops
taking jobs, waits ``job_completion_wait``, then cancels what still runs).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from arq.worker import Worker
from redis.exceptions import RedisError

from shared import keys
from shared.event_log import EventLog
from shared.logs import job_id_var
from shared.redis_conn import connect
from shared.settings import Settings

logger = logging.getLogger(__name__)

JOB_FUNCTION = "chat"  # the one kind of job: ``chat(ctx, job_id)``


class PushWorker(Worker):
    def __init__(self, *args: Any, wake_redis_url: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wake_redis = connect(
            wake_redis_url, socket_connect_timeout=2, socket_timeout=self.poll_delay_s + 5
        )

    async def main(self) -> None:
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        next_full_poll = 0.0
        delay = 0.1
        while True:
            try:
                if time.monotonic() >= next_full_poll:
                    await self._poll_iteration()
                    next_full_poll = time.monotonic() + self.poll_delay_s
                woken = await self._idle_until_woken(next_full_poll - time.monotonic())
                if woken:
                    await self.start_jobs(woken)
                delay = 0.1
            except (RedisError, OSError) as exc:
                logger.warning("worker lost Redis (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _free_slots(self) -> int:
        return self.max_jobs - self.job_counter if self.allow_pick_jobs else 0

    async def _idle_until_woken(self, timeout_s: float) -> list[bytes]:
        """Wait for pushed job ids (or the next full poll); returns the ids to start."""
        if timeout_s <= 0:
            return []
        slots = self._free_slots()
        if slots <= 0:
            await asyncio.sleep(min(timeout_s, 0.05))  # full: wake-ups are for idle workers
            return []
        # From the right: the list is pushed on the left, so the oldest job comes first.
        popped = await self.wake_redis.blmpop(  # type: ignore[misc]
            timeout_s,
            1,
            keys.WAKE,  # type: ignore[arg-type]  # redis-py's stub wants a list here
            direction="RIGHT",
            count=slots,
        )
        return list(popped[1]) if popped else []

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Claim as many of ``job_ids`` as there is room for, in one round trip, and run them.

        Replaces arq's loop, which spends a WATCH/MULTI transaction (four round trips) on
        every id, and then two more in ``run_job`` before the job's code even starts.
        """
        arq_ids = [i for i in dict.fromkeys(j.decode() for j in job_ids) if i not in self.tasks]
        arq_ids = arq_ids[: self._free_slots()]
        if not arq_ids:
            return
        settings: Settings = self.ctx["settings"]
        log: EventLog = self.ctx["event_log"]
        attempts = [
            (arq_id.split(".", 1)[0], arq_id, f"{self.ctx['worker_name']}:{secrets.token_hex(4)}")
            for arq_id in arq_ids
        ]
        claims = await log.claim_many(attempts, int(settings.alive_ttl_s * 1000))
        for (job_id, arq_id, owner), claim in zip(attempts, claims, strict=True):
            await self.sem.acquire()
            self.job_counter += 1
            ctx = {**self.ctx, "job_id": arq_id, "owner": owner, "claim": claim}
            task = self.loop.create_task(self._run(job_id, ctx))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[arq_id] = task

    async def _run(self, job_id: str, ctx: dict[str, Any]) -> None:
        """Run one claimed job under the job timeout: arq's ``run_job``, minus its round
        trips and its result, which nobody reads (the job's stream is the result)."""
        job_id_var.set(job_id)  # every line about the job names it
        arq_id: str = ctx["job_id"]
        task = self.loop.create_task(self.functions[JOB_FUNCTION].coroutine(ctx, job_id))
        self.job_tasks[arq_id] = task
        logger.info("job %s taken (arq id %s)", job_id, arq_id)
        try:
            await asyncio.wait_for(task, self.job_timeout_s)
            self.jobs_complete += 1
        except TimeoutError:
            # The job saw a cancellation: it ended its stream, or handed the job back.
            logger.error(
                "job %s stopped: it ran past JOB_TIMEOUT_S (%g s)", job_id, self.job_timeout_s
            )
            self.jobs_failed += 1
        except Exception:
            logger.exception("job %s failed", job_id)
            self.jobs_failed += 1
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the worker is stopping
            # Only the job was stopped (its heartbeat saw it cancelled, or nobody reading),
            # while it was cleaning up: it has ended. arq's poll must not see an error here.
            self.jobs_failed += 1
        finally:
            del self.job_tasks[arq_id]

    async def close(self) -> None:
        await super().close()
        await self.wake_redis.aclose()
