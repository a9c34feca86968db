"""Connections to Redis, direct or through Sentinel, from the one ``REDIS_URL`` setting.

``redis://host:6379/0`` (or ``rediss://``, ``unix://``) connects directly;
``redis+sentinel://[:password@]host1:26379,host2:26379/<service>/<db>`` asks the sentinels
for the current primary of ``<service>`` and follows it through failovers. The password is
Redis's; sentinels that want one of their own get ``?sentinel_password=...``. Every client of
Streamgate (arq's pool, the relay, the pickup wake-up) comes from here, so none is left
pointing at a dead primary. And every one packs its commands with hiredis (``HiredisPacking``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from arq.connections import ArqRedis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.sentinel import Sentinel

from . import keys
from .cluster import SlotOwnerConnection, cluster_target, is_cluster_url, owners_of
from .urls import host_ports, split_urls

SENTINEL_SCHEME = "redis+sentinel"

R = TypeVar("R", bound=Redis)
P = TypeVar("P", bound=ConnectionPool)


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    service: str
    db: int
    password: str | None
    sentinel_password: str | None


def sentinel_target(url: str) -> SentinelTarget | None:
    """The parts of a ``redis+sentinel://`` URL (ValueError if malformed), else None."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    sentinels = host_ports(parts.netloc.rsplit("@", 1)[-1], "sentinel address")
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("names no Sentinel service: redis+sentinel://host:port/<service>/<db>")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("the path must be /<service> or /<service>/<db number>")
    password = unquote(parts.password) if parts.password else None
    sentinel_password = parse_qs(parts.query).get("sentinel_password", [None])[0]
    db = int(path[1]) if len(path) == 2 else 0
    return SentinelTarget(sentinels, path[0], db, password, sentinel_password)


MGET_BATCH = 1000  # keys per MGET: Redis serves other clients between them


async def mget_many(redis: Redis, names: list[str]) -> list[bytes | None]:
    """The values of ``names`` (None where missing), in one round trip of MGETs."""
    async with redis.pipeline(transaction=False) as pipe:
        for start in range(0, len(names), MGET_BATCH):
            pipe.mget(names[start : start + MGET_BATCH])
        return [value for batch in await pipe.execute() for value in batch]


def connect(url: str, slot: int | None = None, **options: Any) -> Redis:
    """A client (with its own pool) for ``url``; ``options`` go to each connection. For a
    Redis Cluster (``redis+cluster://``), a client of the master that owns ``slot``."""
    if is_cluster_url(url):
        return Redis.from_pool(_cluster_pool(url, slot, ConnectionPool, options))
    return _connect(url, Redis, options)


def connect_arq(url: str, slot: int | None = None, **options: Any) -> ArqRedis:
    """Like ``connect``, as the arq client that enqueues jobs on Streamgate's queue. Its
    pool (direct connections) makes a burst of requests wait for a connection rather
    than fail."""
    if is_cluster_url(url):
        pool = _cluster_pool(url, slot, BlockingConnectionPool, {"timeout": 10, **options})
        client: ArqRedis = ArqRedis.from_pool(pool)  # type: ignore[assignment]
    elif sentinel_target(url) is None:
        pool = BlockingConnectionPool.from_url(url, timeout=10, **options)
        _hiredis_packing(pool)
        client = ArqRedis.from_pool(pool)  # type: ignore[assignment]
    else:
        # Sentinel's pool cannot make a request wait for a connection: past a cap it
        # fails the request, so it gets no cap.
        options.pop("max_connections", None)
        client = _connect(url, ArqRedis, options)
    client.default_queue_name = keys.QUEUE_NAME
    return client


class HiredisPacking:
    """Commands packed by hiredis's C packer rather than redis-py's own pure-Python one,
    which its asyncio connections use even with hiredis installed: 3 µs instead of 20 for
    an event append, on every token."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py does: a command name may carry its subcommand ("CONFIG GET").
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


def _hiredis_packing(pool: ConnectionPool) -> None:
    """Make ``pool``'s connections (plain, TLS, Unix socket or Sentinel-managed) pack with
    hiredis."""
    base: type[AbstractConnection] = pool.connection_class
    if not issubclass(base, HiredisPacking):
        pool.connection_class = type(f"Hiredis{base.__name__}", (HiredisPacking, base), {})


def _cluster_pool(url: str, slot: int | None, pool_class: type[P], options: dict[str, Any]) -> P:
    """A pool of connections to the master owning ``slot`` of the cluster ``url`` names."""
    if slot is None:
        raise ValueError("a Redis Cluster client is for one shard: give its slot")
    target = cluster_target(split_urls(url))
    pool = pool_class(
        connection_class=SlotOwnerConnection,
        owners=owners_of(target),
        slot=slot,
        username=target.username,
        password=target.password,
        **options,
    )
    _hiredis_packing(pool)
    return pool


def _connect(url: str, redis_class: type[R], options: dict[str, Any]) -> R:
    client = _client(url, redis_class, options)
    _hiredis_packing(client.connection_pool)
    return client


def _client(url: str, redis_class: type[R], options: dict[str, Any]) -> R:
    target = sentinel_target(url)
    if target is None:
        direct: R = redis_class.from_url(url, **options)
        return direct
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        target.sentinels,
        sentinel_kwargs={
            "socket_connect_timeout": 2,
            "socket_timeout": 2,
            "password": target.sentinel_password,
        },
    )
    client: R = sentinel.master_for(
        target.service,
        redis_class=redis_class,
        db=target.db,
        password=target.password,
        **options,
    )
    return client
