"""The worker's upstream client: requests built one per event-loop round, so a burst of
job starts cannot hold up the tokens of the jobs already running."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from shared.settings import Settings
from worker.llm import TextDelta, Upstream, UpstreamError, parse_chunk


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


async def first_error(url: str) -> tuple[str, float]:
    """What a request to ``url`` ends with (idle timeout 1 s, two retries), and when."""
    from worker.llm import UpstreamError

    upstream = Upstream(
        Settings(openai_base_url=url, upstream_idle_timeout_s=1, openai_max_retries=2)
    )
    began = time.monotonic()
    try:
        async for _ in upstream.stream([{"role": "user", "content": "hi"}]):
            pass
    except UpstreamError as exc:
        return exc.message, time.monotonic() - began
    finally:
        await upstream.close()
    raise AssertionError("the upstream gave an answer")


def test_an_upstream_silent_before_its_answer_begins_ends_in_the_idle_timeout() -> None:
    """The SDK retries a request whose answer did not begin within its read timeout: the
    idle timeout bounds them all, not each (with two retries it took three timeouts)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # takes connections, answers none
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        message, took = asyncio.run(first_error(url))
    assert "sent nothing for 1 s" in message
    assert took < 1.8, took


def test_a_rate_limit_whose_retry_after_outlasts_the_idle_timeout_is_told_as_one() -> None:
    """The deadline falls while the SDK waits out a 429's Retry-After: the job's error
    says the LLM is rate limiting, not that it sent nothing."""
    body = b'{"error": {"message": "slow down", "type": "rate_limit"}}'
    head = "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 5\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    answer = head.encode() + body

    async def scenario() -> tuple[str, float]:
        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        try:
            return await first_error(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1")
        finally:
            server.close()
            await server.wait_closed()

    message, took = asyncio.run(scenario())
    assert "rate limiting" in message and took < 1.8, (message, took)


def test_a_chunk_holding_a_lone_surrogates_escape_is_read_well_formed() -> None:
    """``"\\ud800"`` is valid JSON that orjson refuses: the token is read, made U+FFFD,
    rather than the answer failing as malformed."""
    deltas = parse_chunk(b'{"choices": [{"index": 0, "delta": {"content": "a\\ud800b"}}]}')
    assert deltas == [TextDelta("a\ufffdb")]
    with pytest.raises(UpstreamError, match="not JSON"):
        parse_chunk(b'{"choices": [')
