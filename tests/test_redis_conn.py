"""Every client packs its commands with hiredis, byte for byte as redis-py would."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.connection import Connection

from shared.redis_conn import HiredisPacking, connect, connect_arq


@pytest.mark.parametrize(
    "command",
    [
        ("PING",),
        ("CONFIG GET", "maxmemory"),
        (b"CLIENT LIST",),
        ("EVALSHA", "a" * 40, 2, "sg:{x}:meta", "sg:{x}:events", 1, 0.5, "é ✓", b"\x00\xff"),
        ("SET", "k", memoryview(b"view"), "PX", 1000),
        ("XADD", "s", "*", "d", "x" * 100_000),  # above redis-py's chunking cutoff
    ],
)
def test_packs_like_redis_py(command: tuple[object, ...]) -> None:
    class Hiredis(HiredisPacking, Connection):
        pass

    expected = b"".join(Connection().pack_command(*command))  # type: ignore[arg-type]
    assert b"".join(Hiredis().pack_command(*command)) == expected


def test_every_client_of_ours_packs_with_hiredis(redis_url: str) -> None:
    async def main() -> None:
        for client in (connect(redis_url), connect_arq(redis_url)):
            try:
                assert await client.ping()
                assert issubclass(client.connection_pool.connection_class, HiredisPacking)
                await client.set("sg:test:packing", "✓")
                assert (await client.get("sg:test:packing")).decode() == "✓"
            finally:
                await client.delete("sg:test:packing")
                await client.aclose()

    asyncio.run(main())
