"""The relay's per-client mailbox: bounded, in order, ended by the final event."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from gateway.reader import PING, Reader
from shared import keys

from . import sse
from .harness import Stack


def frames_of(reader: Reader, ping_s: float = 0.05) -> list[bytes]:
    async def collect() -> list[bytes]:
        return [chunk async for chunk in reader.frames_until_end(ping_s)]

    return asyncio.run(collect())


def test_a_reader_gets_frames_in_order_and_stops_after_the_final_one() -> None:
    reader = Reader("a" * 32, "0-0", bound=10, started_at=None)
    reader.push(b"one", (1, 0), final=False)
    reader.push(b"two", (2, 0), final=True)
    reader.push(b"late", (3, 0), final=False)  # nothing follows a final event
    assert frames_of(reader) == [b"onetwo"]
    assert reader.after == (2, 0)


def test_a_full_reader_pauses_until_its_client_takes_what_it_holds() -> None:
    drained: list[Reader] = []
    reader = Reader("a" * 32, "0-0", bound=3, started_at=None, on_drained=drained.append)
    taken = [reader.push(b"frame", (i + 1, 0), final=False) for i in range(5)]
    assert taken == [True, True, True, False, False]  # the rest is read again later
    assert reader.paused and reader.after == (3, 0) and not reader.ended
    assert drained == []

    async def take_and_send() -> None:
        chunks = reader.frames_until_end(1)
        assert await anext(chunks) == b"frame" * 3
        assert reader.paused and drained == [], "nothing more while the chunk is being sent"
        with contextlib.suppress(TimeoutError):  # sent: it asks for more, then waits
            await asyncio.wait_for(anext(chunks), 0.05)
        await chunks.aclose()

    asyncio.run(take_and_send())
    assert drained == [reader] and not reader.paused  # the relay reads on from (3, 0)
    assert reader.push(b"next", (4, 0), final=False)


def test_a_reader_holds_at_most_its_bytes() -> None:
    reader = Reader("a" * 32, "0-0", bound=1000, started_at=None, bound_bytes=10_000)
    pushed = 0
    while reader.push(b"x" * 4000, (pushed + 1, 0), final=False):
        pushed += 1
    assert pushed == 3 and reader.pending_bytes == 12_000  # full at 10,000: one frame over


def test_an_idle_reader_pings() -> None:
    reader = Reader("a" * 32, "0-0", bound=3, started_at=None)

    async def first_two() -> list[bytes]:
        chunks = reader.frames_until_end(0.01)
        got = [await anext(chunks), await anext(chunks)]
        await chunks.aclose()
        return got

    assert asyncio.run(first_two()) == [PING, PING]


@pytest.mark.slow
def test_a_client_that_stops_reading_does_not_hold_up_others(
    stack: Stack, client: httpx.Client
) -> None:
    job_id = client.post(
        stack.gateway.url + "/chat", json={"prompt": "[long 5000] [delay 0]"}
    ).json()["job_id"]
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", stack.gateway.port or 0))
    stuck.sendall(f"GET /chat/{job_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    try:
        started = time.monotonic()
        stream = sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events")
        assert stream.text == "".join(f"t{i} " for i in range(5000))
        assert time.monotonic() - started < 20
    finally:
        stuck.close()


def test_a_reader_joining_mid_stream_from_the_start_misses_nothing(
    stack: Stack, client: httpx.Client
) -> None:
    """A second reader of a job this gateway already relays joins while a read of the
    job's stream, from a later cursor, is in flight: it must still get every event."""
    expected = "".join(f"t{i} " for i in range(300))
    for _ in range(5):
        job_id = client.post(
            stack.gateway.url + "/chat", json={"prompt": "[long 300] [delay 0.005]"}
        ).json()["job_id"]
        url = f"{stack.gateway.url}/chat/{job_id}/events"
        with client.stream("GET", url) as first:
            chunks = first.iter_raw()
            seen = b""
            while seen.count(b'"token"') < 20:
                seen += next(chunks)
            late = sse.read(client, url)  # joins while the first reader's reads go on
        assert late.text == expected


def test_past_the_multiplex_limit_streams_follow_the_doorbell_without_losing_events(
    make_stack: Callable[..., Stack],
) -> None:
    """Over RELAY_MULTIPLEX_MAX streams the relay reads only the streams that rang the
    doorbell; as streams start and end it switches between both ways of reading, and
    every reader, a late joiner's included, still gets every event in order, as it comes
    (the watchdog's read of streams silent for 5 s would show as gaps)."""
    stack = make_stack(RELAY_MULTIPLEX_MAX="2", WORKER_LOST_TIMEOUT_S="20", QUEUE_TIMEOUT_S="20")
    expected = "".join(f"t{i} " for i in range(120))

    def one(n: int) -> tuple[str, float]:
        arrivals: list[float] = []
        raw = b""
        params = {"prompt": f"[long 120] [delay 0.01] {n}"}
        with (
            httpx.Client(timeout=30) as client,
            client.stream("GET", stack.gateway.url + "/chat", params=params) as response,
        ):
            for chunk in response.iter_raw():
                raw += chunk
                if b'"token"' in chunk:
                    arrivals.append(time.monotonic())
        text = "".join(m.data.get("token", "") for m in sse.parse(raw)[0])
        return text, max(b - a for a, b in itertools.pairwise(arrivals))

    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
        runs = [pool.submit(one, n) for n in range(6)]
        job_id = client.post(
            stack.gateway.url + "/chat", json={"prompt": "[long 120] [delay 0.01] joined"}
        ).json()["job_id"]
        url = f"{stack.gateway.url}/chat/{job_id}/events"
        early = sse.read(client, url, stop_after=30)
        late = sse.read(client, url)  # a second reader, from the start, mid-stream
        results = [r.result() for r in runs]
    assert [text for text, _ in results] == [expected] * 6
    assert max(gap for _, gap in results) < 2.0, results  # a missed doorbell waits ~5 s
    assert expected.startswith(early.text) and late.text == expected
    doorbell = redis.Redis.from_url(stack.redis_url)
    assert doorbell.xlen(keys.ACTIVITY) > 0  # every write rang
    doorbell.close()


def test_past_the_multiplex_limit_a_cursor_resumes_on_another_gateway_exactly(
    make_stack: Callable[..., Stack],
) -> None:
    """Both gateways follow the doorbell (each relays more streams than RELAY_MULTIPLEX_MAX),
    so the tokens come from the doorbell's copies: a reader cut mid-stream on one resumes by
    its cursor on the other with every token after it, once each, in order."""
    stack = make_stack(gateways=2, RELAY_MULTIPLEX_MAX="2", QUEUE_TIMEOUT_S="20")
    first, second = stack.gateways
    expected = "".join(f"t{i} " for i in range(80))

    def hold(url: str, n: int) -> str:  # keeps a gateway past the limit meanwhile
        with httpx.Client(timeout=30) as own:
            return sse.read(
                own, url + "/chat", params={"prompt": f"[long 60] [delay 0.06] {n}"}
            ).text

    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
        held = [pool.submit(hold, gateway.url, n) for n in range(3) for gateway in (first, second)]
        for n in range(3):
            params = {"prompt": f"[long 80] [delay 0.01] resumed {n}"}
            part = sse.read(client, first.url + "/chat", params=params, stop_after=10 + 20 * n)
            rest = sse.read(client, second.url + "/chat", headers={"Last-Event-ID": part.last_id})
            assert sse.ends_done(rest), rest.events
            assert part.text + rest.text == expected
        assert [h.result() for h in held] == ["".join(f"t{i} " for i in range(60))] * 6
    doorbell = redis.Redis.from_url(stack.redis_url)
    assert doorbell.xlen(keys.ACTIVITY) > 0  # the gateways followed the doorbell
    doorbell.close()
