"""The worker's shards: per Redis of ``REDIS_URL``, the clients and what rides on them.

A worker takes jobs from every shard (pickup.py runs one pickup loop per shard, all
sharing the worker's slots) and runs each job against its own shard alone: its event
log, its heartbeat, its session, its clock. A shard that is down stops only its own loop
and jobs; the others carry on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import Redis

from shared.keys import Keys
from shared.redis_clock import RedisClock
from shared.redis_conn import connect, connect_arq
from shared.shards import ShardSpec

POOL_PER_SHARD = 32  # a worker's pooled connections to each shard (its wake-up apart)


@dataclass
class WorkerShard:
    index: int
    name: str  # its URL without password, as operators see it
    keys: Keys
    pool: ArqRedis  # every command but the idle wait
    wake: Redis  # the idle worker's blocking pop of new jobs
    suffix: str  # tells its tasks apart from other shards' (ShardSpec.suffix)
    clock: RedisClock = field(default_factory=RedisClock)  # this Redis's, from the heartbeat
    # What a job of this shard finds in its ctx (event log, batcher, heartbeat, sessions),
    # made in on_startup.
    ctx: dict[str, Any] = field(default_factory=dict)


def open_shards(specs: list[ShardSpec], wake_timeout_s: float) -> list[WorkerShard]:
    return [
        WorkerShard(
            spec.index,
            spec.name,
            spec.keys,
            connect_arq(
                spec.url,
                spec.slot,
                socket_connect_timeout=2,
                socket_timeout=10,
                max_connections=POOL_PER_SHARD,
            ),
            connect(spec.url, spec.slot, socket_connect_timeout=2, socket_timeout=wake_timeout_s),
            spec.suffix,
        )
        for spec in specs
    ]
