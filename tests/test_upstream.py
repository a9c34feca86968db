"""The worker's upstream client: requests built one per event-loop round, so a burst of
job starts cannot hold up the tokens of the jobs already running."""

from __future__ import annotations

import asyncio

from shared.settings import Settings
from worker.llm import Upstream


def test_a_burst_of_requests_takes_one_loop_round_each() -> None:
    async def scenario() -> list[int]:
        upstream = Upstream(Settings(openai_base_url="http://127.0.0.1:9/v1"))
        rounds = 0

        def tick() -> None:  # counts event-loop rounds: reschedules itself each round
            nonlocal rounds
            rounds += 1
            loop.call_soon(tick)

        loop = asyncio.get_running_loop()
        loop.call_soon(tick)
        seen: list[int] = []

        async def request() -> None:
            await upstream._take_turn()
            seen.append(rounds)  # where the request would now be built

        await asyncio.gather(*(request() for _ in range(20)))
        await upstream.close()
        return seen

    seen = asyncio.run(scenario())
    assert len(seen) == 20
    assert len(set(seen)) == 20  # never two in the same round
