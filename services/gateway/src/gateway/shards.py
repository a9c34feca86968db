"""The gateway's shards: per Redis of ``REDIS_URL``, its clients, event log, relay and
sessions, and the choice of where a new job goes.

A new job goes to the next shard in turn that is not known to be down. A shard is known
down for ``DOWN_FOR_S`` after a command to it could not even be sent (its connection was
refused or timed out), until a command to it is answered, and a job that met such a shard
goes to the next one at once: it was written nowhere. Jobs of a session go to the session's
own shard, which has its turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import shards as placement
from shared import tool_catalog, tracing
from shared.event_log import EventLog
from shared.held_connection import NotSent
from shared.redis_clock import RedisClock
from shared.redis_conn import connect, connect_arq
from shared.sessions import SessionStore
from shared.settings import Settings
from shared.shards import ShardSpec, shard_specs
from shared.timing import Timing

from .metrics import GatewayMetrics
from .relay import Relay

POOL_PER_SHARD = 64  # a gateway's pooled connections to each shard (the relay's reader apart)
DOWN_FOR_S = 2.0  # how long a shard that refused a connection gets no new jobs
PING_TIMEOUT_S = 2.0
ROUND_TRIP_S = 5.0  # the longest a command's answer is waited for
CREATE_WITHIN_S = ROUND_TRIP_S - 1  # Redis runs a create only this long after it was sent

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass
class Shard:
    index: int
    name: str  # its URL without password, as operators see it
    arq: ArqRedis  # the pool for every non-blocking command
    blocking: Redis  # the relay's XREAD BLOCK
    log: EventLog
    relay: Relay
    sessions: SessionStore
    suffix: str = ""  # tells its tasks apart from other shards' (ShardSpec.suffix)
    # This Redis's, from its answers; on the monotonic clock, which no host's step moves.
    clock: RedisClock = field(default_factory=lambda: RedisClock(time.monotonic))
    down_until: float = field(default=0.0)  # 0 once it answered since it was found down
    marked_at: float = field(default=-1.0)  # when it was last found down
    _looking: set[asyncio.Task[bool]] = field(default_factory=set)  # a ping (see attempt)
    _closing: bool = field(default=False)

    @property
    def known_down(self) -> bool:
        return time.monotonic() < self.down_until

    def mark_down(self) -> None:
        self.marked_at = time.monotonic()
        self.down_until = self.marked_at + DOWN_FOR_S

    async def attempt(self, call: Callable[[], Awaitable[T]], skippable: bool = False) -> T:
        """``call`` on this shard, keeping what it shows: a call that could not be sent, or
        got no answer in time (a hung Redis), marks the shard down for ``DOWN_FOR_S``, one
        answered clears the mark. A ``skippable`` call (one that can do without this shard)
        raises ``NotSent`` until the shard answers again: once the mark lapses a ping looks,
        not a user's call waiting out a hung shard's round trip."""
        if skippable and self.down_until > 0:
            if not self.known_down and not self._looking and not self._closing:
                self._look_again()
            raise NotSent(f"{self.name} was found down in the last seconds")
        began = time.monotonic()
        try:
            result = await call()
        except (NotSent, RedisTimeoutError):
            self.mark_down()
            raise
        if began >= self.marked_at:  # an answer to a call sent before the mark tells nothing
            self.down_until = 0.0
        return result

    def _look_again(self) -> None:
        # A call's whole round trip: a shard slow to answer yet answering is up. The ping
        # clears the mark, or sets it again.
        task = asyncio.get_running_loop().create_task(self.reachable(ROUND_TRIP_S))
        self._looking.add(task)  # held: the loop keeps only a weak reference
        task.add_done_callback(self._looking.discard)

    async def stop_looking(self) -> None:
        """Cancel a ping still looking, and start none (at shutdown: the pool closes)."""
        self._closing = True
        for ping in list(self._looking):
            ping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ping

    async def reachable(self, timeout_s: float = PING_TIMEOUT_S) -> bool:
        began = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                await self.arq.ping()
        except (RedisError, OSError, TimeoutError):
            self.mark_down()
            return False
        if began >= self.marked_at:  # as in attempt: an answer from before the mark
            self.down_until = 0.0
        return True


class Shards:
    def __init__(self, shards: list[Shard], shutting_down: anyio.Event) -> None:
        self.all = shards
        self.shutting_down = shutting_down  # set on SIGTERM: every relay ends its streams
        self._turn = itertools.count()

    def __iter__(self) -> Iterator[Shard]:
        return iter(self.all)

    def __len__(self) -> int:
        return len(self.all)

    def of_job(self, job_id: str) -> Shard:
        """The shard of a well-formed job id."""
        return self.all[placement.shard_of(job_id, len(self.all))]

    def home(self, name: str) -> Shard:
        """The shard of a session, an AI SDK chat or a caller."""
        return self.all[placement.home(name, len(self.all))]

    def in_turn(self) -> list[Shard]:
        """Every shard, in the order a new job tries them: the next in turn first, those
        known down last."""
        start = next(self._turn) % len(self.all)
        ordered = self.all[start:] + self.all[:start]
        return sorted(ordered, key=lambda shard: shard.known_down)

    async def down(self) -> list[Shard]:
        """The shards that do not answer a PING now."""
        answers = await asyncio.gather(*(shard.reachable() for shard in self.all))
        return [shard for shard, up in zip(self.all, answers, strict=True) if not up]

    async def tools(self) -> list[dict[str, Any]] | None:
        """The tools the workers listed (each lists them in every shard): from the first
        shard that has them (a shard just added or restarted may not yet); None if none
        has; the last error if no shard answers."""
        error: Exception | None = None
        answered = False
        for shard in sorted(self.all, key=lambda shard: shard.known_down):  # the turn unmoved
            try:
                tools = await tool_catalog.read(shard.arq, shard.log.keys)
            except (RedisError, OSError) as exc:
                error = exc
                continue
            if tools is not None:
                return tools
            answered = True
        if error is not None and not answered:
            raise error
        return None

    async def place(
        self,
        attempt: Callable[[Shard], Awaitable[T]],
        also_next_on: tuple[type[Exception], ...] = (),
    ) -> T:
        """``attempt`` on the shards in turn until one takes the job: the next is tried when
        a shard could not be sent it, did not answer in time (a hung Redis: should it wake,
        the create runs past its deadline and writes nothing), or refused it with
        ``also_next_on``; the last shard's error is raised."""
        candidates = self.in_turn()
        passable: tuple[type[Exception], ...] = (NotSent, RedisTimeoutError, *also_next_on)
        for shard in candidates:
            # All but the last may be skipped: a shard found down is passed over until a
            # ping finds it answering, rather than every chat waiting out its round trip.
            last = shard is candidates[-1]
            try:
                return await shard.attempt(functools.partial(attempt, shard), skippable=not last)
            except passable as exc:
                if last:
                    raise
                if isinstance(exc, RedisTimeoutError):
                    logger.warning(
                        "%s did not answer (%s): the chat goes to the next shard", shard.name, exc
                    )
                tracing.note(
                    "streamgate.shard_passed_over",
                    {"streamgate.shard": shard.name, "error.type": type(exc).__name__},
                )
        raise AssertionError("unreachable: the last shard returns or raises")


def open_shards(settings: Settings, timing: Timing, metrics: GatewayMetrics) -> Shards:
    shutting_down = anyio.Event()
    specs = shard_specs(settings.redis_url)
    return Shards(
        [open_shard(spec, settings, timing, metrics, shutting_down) for spec in specs],
        shutting_down,
    )


def open_shard(
    spec: ShardSpec,
    settings: Settings,
    timing: Timing,
    metrics: GatewayMetrics,
    shutting_down: anyio.Event,
) -> Shard:
    """A shard's clients and what rides on them; connections are made on first use, so
    a gateway starts (and answers /healthz) whichever shards are down."""
    # Fail fast while Redis is down (503 within seconds). A request waits for a pooled
    # connection rather than fail, and the pool is bounded per shard.
    arq = connect_arq(
        spec.url,
        spec.slot,
        socket_connect_timeout=2,
        socket_timeout=ROUND_TRIP_S,
        max_connections=POOL_PER_SHARD,
    )
    # The relay's XREAD BLOCK: one command at a time, so one connection. The relay bounds
    # each round trip itself (a socket timeout costs a task per command).
    blocking = connect(spec.url, spec.slot, socket_connect_timeout=2)
    log = EventLog(arq, timing, spec.keys)
    sessions = SessionStore.of(log, settings)
    relay = Relay(arq, blocking, log, settings, metrics, shutting_down, spec)
    return Shard(spec.index, spec.name, arq, blocking, log, relay, sessions, spec.suffix)


async def close_shard(shard: Shard) -> None:
    await shard.stop_looking()
    await shard.relay.stop()
    await shard.blocking.aclose()
    await shard.arq.aclose()
