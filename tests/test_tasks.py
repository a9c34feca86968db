"""Background loops stop when told, even when a cancellation is lost on the way."""

from __future__ import annotations

import asyncio
import random

from shared.redis_conn import connect
from shared.tasks import cancel_and_wait


def test_a_redis_read_loop_stops_however_a_cancel_lands(redis_url: str) -> None:
    # Like the worker's and the watchdog's loops: a client with a socket timeout, while
    # entries arrive. A plain cancel() is lost here often (redis-py sends under wait_for).
    async def main() -> None:
        reader = connect(redis_url, socket_timeout=10)
        writer = connect(redis_url)
        key = "sg:test:cancel-loop"

        async def write() -> None:
            while True:
                await writer.xadd(key, {b"t": b"1"}, maxlen=100, approximate=True)
                await asyncio.sleep(0)

        async def read() -> None:
            cursor = "$"
            while True:
                found = await reader.xread({key: cursor}, block=5000, count=10)
                if found:
                    cursor = found[0][1][-1][0]

        writing = asyncio.create_task(write())
        try:
            for _ in range(60):
                reading = asyncio.create_task(read())
                await asyncio.sleep(random.random() * 0.003)
                await asyncio.wait_for(cancel_and_wait([reading]), 2)
                assert reading.cancelled()
        finally:
            await cancel_and_wait([writing])
            await writer.delete(key)
            await reader.aclose()
            await writer.aclose()

    asyncio.run(main())
