"""Event-driven job pickup on top of arq, which only polls, and a lean start of each job.

arq's worker polls its queue every ``poll_delay`` and, on each poll, re-checks every job
still in the queue, those running included (~4 round trips each); each job it starts then
costs two more round trips (arq's in-progress mark, then its job record and retry count)
before our own claim. Here:

- An idle worker blocks on the ``WAKE`` list, to which each new job's arq id is pushed when
  it is enqueued (oldest first, several at once when it has room for them). A poll of
  arq's queue still runs every ``poll_delay`` as a fallback, for jobs that have waited
  ``POLL_AFTER_S`` (a wake-up lost or trimmed): younger ones belong to the wake-ups.
- The event log's claim takes the job off arq's queue in the same step that makes this
  worker its owner and writes ``started``. A job running is then in the gateways' hands
  (its heartbeat, their idle check and janitor), not arq's, so arq's in-progress key,
  retry count and result are not kept: a job handed back is queued again under a fresh
  arq id, and one whose worker died is re-queued or ended by the gateways, never run
  twice by arq.
- A new job's wake-up carries its request (when small): the job sends it to the LLM at
  once, while its claim is on its way, and closes it again in the rare case the claim
  says no (the job was cancelled meanwhile). The claim's round trip is thus off the path to
  the first token; only one worker pops each wake-up, and the poll leaves young jobs
  alone, so two workers never race for one.
- The loop rides out Redis outages instead of exiting, so a worker needs no restart when
  Redis comes back.

arq still runs the fallback poll, its health check and the graceful shutdown (it stops
taking jobs, waits ``job_completion_wait``, then cancels what still runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import time
from typing import Any

from arq.worker import Worker
from redis.exceptions import RedisError

from shared.event_log import Claim, EventLog, pending_job
from shared.logs import job_id_var
from shared.timing import EARLY_WITHIN_S, POLL_AFTER_S

from .shards import WorkerShard

logger = logging.getLogger(__name__)

JOB_FUNCTION = "chat"  # the one kind of job: ``chat(ctx, job_id)``


class PushWorker(Worker):
    def __init__(self, *args: Any, shards: list[WorkerShard], **kwargs: Any) -> None:
        # arq's own pool (its health check) is the first shard's.
        super().__init__(*args, redis_pool=shards[0].pool, **kwargs)
        self.shards = shards

    async def main(self) -> None:
        self.ctx["shards"] = self.shards
        if self.on_startup:
            await self.on_startup(self.ctx)
        await asyncio.gather(*(self._pick_up(shard) for shard in self.shards))

    async def _pick_up(self, shard: WorkerShard) -> None:
        """Take the shard's jobs while there are slots; every shard's loop shares them."""
        where = f" {shard.name}" if len(self.shards) > 1 else ""
        next_full_poll = 0.0
        delay = 0.1
        while not self._stopping:
            try:
                if time.monotonic() >= next_full_poll:
                    await self._poll(shard)
                    next_full_poll = time.monotonic() + self.poll_delay_s
                woken = await self._idle_until_woken(shard, next_full_poll - time.monotonic())
                if woken:
                    left = await self._start_jobs(shard, woken)
                    if left:  # no room (or stopping): the next worker to wait takes them
                        await shard.wake.rpush(shard.keys.wake, *left)  # type: ignore[misc]
                delay = 0.1
            except (RedisError, OSError) as exc:
                logger.warning("worker lost Redis%s (%s); retrying in %.1f s", where, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    @property
    def _stopping(self) -> bool:
        """arq stops the main loop by cancelling it (at once, or after the shutdown grace).
        redis-py can swallow that cancellation during a blocking read and return what it
        popped (seen with BLMPOP), but the request stays counted on the task."""
        task = self.main_task
        return task is not None and task.cancelling() > 0

    def _free_slots(self) -> int:
        return self.max_jobs - self.job_counter if self.allow_pick_jobs else 0

    async def _idle_until_woken(self, shard: WorkerShard, timeout_s: float) -> list[bytes]:
        """Wait for pushed job ids (or the next full poll); returns the ids to start."""
        if timeout_s <= 0:
            return []
        slots = self._free_slots()
        if slots <= 0:
            await asyncio.sleep(min(timeout_s, 0.05))  # full: wake-ups are for idle workers
            return []
        # From the right: the list is pushed on the left, so the oldest job comes first.
        popped = await shard.wake.blmpop(  # type: ignore[misc]
            timeout_s,
            1,
            shard.keys.wake,  # type: ignore[arg-type]  # redis-py's stub wants a list here
            direction="RIGHT",
            count=slots,
        )
        return list(popped[1]) if popped else []

    async def _poll(self, shard: WorkerShard) -> None:
        """arq's poll, as the fallback: jobs that have waited ``POLL_AFTER_S``."""
        if self._free_slots() > 0:
            waited = shard.clock.now_ms() - int(POLL_AFTER_S * 1000)  # queued on Redis's clock
            found = await shard.pool.zrangebyscore(
                shard.keys.queue, "-inf", waited, start=0, num=self.queue_read_limit
            )
            await self._start_jobs(shard, found)
        for arq_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[arq_id]
        if shard is self.shards[0]:
            await self.heart_beat()  # arq's health check, in arq's pool

    async def _start_jobs(self, shard: WorkerShard, wake_ups: list[bytes]) -> list[bytes]:
        """Claim as many of these jobs (wake-ups or arq ids) as there is room for, in one
        round trip, and start them without waiting for it: each awaits its own claim.
        Returns the wake-ups it had no room for.

        Replaces arq's loop, which spends a WATCH/MULTI transaction (four round trips) on
        every id, and then two more in ``run_job`` before the job's code even starts.
        """
        room = 0 if self._stopping else self._free_slots()
        jobs: dict[str, bytes | None] = {}
        left: list[bytes] = []
        now_ms = shard.clock.now_ms()
        for wake_up in wake_ups:
            arq_id, early = _parse_wake_up(wake_up, now_ms)
            if arq_id in self.tasks or arq_id in jobs:
                continue
            if len(jobs) < room:
                jobs[arq_id] = early
            else:
                left.append(wake_up)
        attempts = [
            (pending_job(arq_id), arq_id, f"{self.ctx['worker_name']}:{secrets.token_hex(4)}")
            for arq_id in jobs
        ]
        if not attempts:
            return left
        # The slots are taken now: another shard's loop may run during the await below.
        self.job_counter += len(attempts)
        log: EventLog = shard.ctx["event_log"]
        claims = _each(asyncio.ensure_future(log.claim_many(attempts)), len(attempts))
        # Let the claim reach the socket before the jobs start: their first step builds the
        # LLM request (~2 ms of CPU in the SDK), which would otherwise go first (measured:
        # enqueue -> started 2.1 ms without this, 0.7 ms with it).
        await asyncio.sleep(0)
        for (job_id, arq_id, owner), claim in zip(attempts, claims, strict=True):
            await self.sem.acquire()  # free: the counter held the slot
            ctx = {
                **self.ctx,
                **shard.ctx,
                "job_id": arq_id,
                "owner": owner,
                "claim": claim,
                "early_request": jobs[arq_id],
            }
            task = self.loop.create_task(self._run(job_id, ctx))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[arq_id] = task
        return left

    async def _run(self, job_id: str, ctx: dict[str, Any]) -> None:
        """Run one claimed job under the job timeout: arq's ``run_job``, minus its round
        trips and its result, which nobody reads (the job's stream is the result)."""
        job_id_var.set(job_id)  # every line about the job names it
        arq_id: str = ctx["job_id"]
        task = self.loop.create_task(self.functions[JOB_FUNCTION].coroutine(ctx, job_id))
        self.job_tasks[arq_id] = task
        logger.info("job %s taken (arq id %s)", job_id, arq_id)

        def time_out() -> None:
            # Said in ctx before the cancel: the job ends its stream saying why, and does
            # not hand itself back (it would only time out again). ``wait_for`` cannot
            # tell: the job returns normally from its cancellation.
            ctx["timed_out"] = True
            logger.error(
                "job %s stopped: it ran past JOB_TIMEOUT_S (%g s)", job_id, self.job_timeout_s
            )
            task.cancel()

        timer = self.loop.call_later(self.job_timeout_s, time_out)
        try:
            await task
            if ctx.get("timed_out"):
                self.jobs_failed += 1
            else:
                self.jobs_complete += 1
        except Exception:
            logger.exception("job %s failed", job_id)
            self.jobs_failed += 1
        except asyncio.CancelledError:
            # The worker is stopping, or the job's heartbeat stopped it (cancelled, nobody
            # reading): the job has handed itself back or ended. Returning, as arq's own
            # run_job does, keeps arq's poll and its shutdown from seeing an error.
            self.jobs_failed += 1
        finally:
            timer.cancel()
            del self.job_tasks[arq_id]

    async def close(self) -> None:
        """arq's ``close``, but its health-check key's deletion may fail (its shard down)
        without skipping ``on_shutdown``: tools, batchers and spans are closed whatever."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if self._pool is None:
            return
        await asyncio.gather(*self.tasks.values())
        with contextlib.suppress(RedisError, OSError):
            await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        self._pool = None
        for shard in self.shards:
            await shard.wake.aclose()
            await shard.pool.aclose()


def _parse_wake_up(wake_up: bytes, now_ms: int) -> tuple[str, bytes | None]:
    """A wake-up (or a bare arq id from the poll): the arq id, and the request if it
    carries one recent enough to send before the claim (both times Redis's)."""
    arq_id, _, rest = wake_up.partition(b" ")
    enqueued_ms, _, request = rest.partition(b" ")
    if not request or now_ms - int(enqueued_ms) > EARLY_WITHIN_S * 1000:
        return arq_id.decode(), None
    return arq_id.decode(), request


def _each(claims: asyncio.Future[list[Claim]], count: int) -> list[asyncio.Future[Claim]]:
    """One future per job of a ``claim_many``: each job awaits its own."""
    loop = asyncio.get_running_loop()
    each: list[asyncio.Future[Claim]] = [loop.create_future() for _ in range(count)]

    def settle(done: asyncio.Future[list[Claim]]) -> None:
        for index, future in enumerate(each):
            if future.done():
                continue
            if done.cancelled():
                future.cancel()
            elif (error := done.exception()) is not None:
                future.set_exception(error)
            else:
                future.set_result(done.result()[index])

    claims.add_done_callback(settle)
    return each
