"""The tools the workers offer, as ``GET /tools`` lists them.

A worker owns its MCP connections, so only workers know which tools exist: each publishes
its list under its own key, renewed every CATALOG_RENEW_S and at once when the list
changes, and gone CATALOG_TTL_S after the worker stops renewing it (a dead worker's tools
leave the list by themselves). Readers merge the lists; workers meant to run the same
tools file agree, and a tool any live worker offers is listed.
"""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

from .keys import Keys

CATALOG_RENEW_S = 10.0
CATALOG_TTL_S = 30


async def publish(redis: Redis, names: Keys, worker: str, tools: list[dict[str, Any]]) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(names.tool_catalog(worker), orjson.dumps(tools), ex=CATALOG_TTL_S)
        pipe.sadd(names.tool_catalogs, worker)
        await pipe.execute()


async def withdraw(redis: Redis, names: Keys, worker: str) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(names.tool_catalog(worker))
        pipe.srem(names.tool_catalogs, worker)
        await pipe.execute()


async def read(redis: Redis, names: Keys) -> list[dict[str, Any]] | None:
    """Every live worker's tools, each name once (in the order the first worker lists
    them); None when no worker has published."""
    workers = sorted(w.decode() for w in await redis.smembers(names.tool_catalogs))  # type: ignore[misc]
    if not workers:
        return None
    catalogs = await redis.mget([names.tool_catalog(w) for w in workers])
    gone = [w for w, catalog in zip(workers, catalogs, strict=True) if catalog is None]
    if gone:
        await redis.srem(names.tool_catalogs, *gone)  # type: ignore[misc]
    merged: dict[str, dict[str, Any]] = {}
    for catalog in catalogs:
        for tool in orjson.loads(catalog) if catalog is not None else ():
            merged.setdefault(tool["name"], tool)
    return list(merged.values()) if len(gone) < len(workers) else None
