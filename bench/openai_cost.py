"""``python -m bench.openai_cost``: what the OpenAI encoders cost against the native dialect.

One stack (Redis, the demo LLM, a worker, a gateway), and the same jobs read three ways,
alternating in rounds so a slow moment of the machine hits each alike: ``GET /chat``
(native SSE), ``POST /v1/chat/completions`` streamed, and ``POST /v1/responses`` streamed.
Each round measures the time to the first token of ``--ttft-requests`` requests one after
another, then the gateway's CPU per token over ``--streams`` concurrent streams of
``--tokens`` tokens ``--delay`` seconds apart. Prints p50 time to first token and CPU per
token for each dialect, and the ratios to the native one.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import orjson

from .measure import cpu_seconds
from .processes import Cluster
from .runner import progress

Opened = AbstractAsyncContextManager[httpx.Response]


def _native(client: httpx.AsyncClient, base: str, prompt: str) -> Opened:
    return client.stream("GET", base + "/chat", params={"prompt": prompt})


def _chat(client: httpx.AsyncClient, base: str, prompt: str) -> Opened:
    body = {"model": "assistant", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    return client.stream("POST", base + "/v1/chat/completions", json=body)


def _responses(client: httpx.AsyncClient, base: str, prompt: str) -> Opened:
    body = {"model": "assistant", "stream": True, "input": prompt}
    return client.stream("POST", base + "/v1/responses", json=body)


DIALECTS = {"native": _native, "chat.completions": _chat, "responses": _responses}
FIRST_TOKEN = {
    "native": b'"token"',
    "chat.completions": b'"content":"t',
    "responses": b'"response.output_text.delta"',
}


async def one(client: httpx.AsyncClient, base: str, dialect: str, prompt: str) -> float:
    """Seconds to the first token; reads the stream to its end."""
    began = time.perf_counter()
    first = 0.0
    async with DIALECTS[dialect](client, base, prompt) as response:
        async for chunk in response.aiter_raw():
            if not first and FIRST_TOKEN[dialect] in chunk:
                first = time.perf_counter() - began
    return first


async def run_round(
    base: str, pid: int, o: argparse.Namespace, dialect: str
) -> tuple[float, float]:
    """(p50 time to first token in ms, gateway CPU ms per token) for one dialect."""
    limits = httpx.Limits(max_connections=o.streams + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        firsts = [
            await one(client, base, dialect, f"[long 5] [delay 0] ttft {i}")
            for i in range(o.ttft_requests)
        ]
        prompt = f"[long {o.tokens}] [delay {o.delay}] cpu"
        cpu = cpu_seconds(pid)
        await asyncio.gather(*(one(client, base, dialect, prompt) for _ in range(o.streams)))
        cpu = cpu_seconds(pid) - cpu
    return statistics.median(firsts) * 1000, cpu * 1000 / (o.streams * o.tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttft-requests", type=int, default=30)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.01)
    parser.add_argument("--dialects", default=",".join(DIALECTS), help="comma-separated")
    o = parser.parse_args()
    dialects = o.dialects.split(",")
    logdir = Path(tempfile.mkdtemp(prefix="streamgate-openai-cost-"))
    cluster = Cluster(logdir, llm_delay_s=0, workers=1, worker_max_jobs=None)
    progress(f"starting the stack; logs in {logdir}")
    cluster.start()
    try:
        assert cluster.gateway is not None
        base = f"http://127.0.0.1:{cluster.gateway_port}"
        results: dict[str, list[tuple[float, float]]] = {d: [] for d in dialects}
        for number in range(o.rounds):
            order = dialects if number % 2 == 0 else list(reversed(dialects))
            for dialect in order:
                measured = asyncio.run(run_round(base, cluster.gateway.pid, o, dialect))
                results[dialect].append(measured)
                progress(f"round {number + 1} {dialect}: TTFT p50 {measured[0]:.2f} ms,"
                         f" gateway {measured[1]:.4f} ms CPU/token")  # fmt: skip
        native_ttft = statistics.median(r[0] for r in results["native"])
        native_cpu = statistics.median(r[1] for r in results["native"])
        print(f"{o.streams} streams x {o.tokens} tokens {o.delay} s apart; "
              f"TTFT over {o.ttft_requests} requests; median of {o.rounds} rounds")  # fmt: skip
        print("| dialect | TTFT p50 | vs native | gateway CPU per token | vs native |")
        print("|---|---:|---:|---:|---:|")
        for dialect, rows in results.items():
            ttft = statistics.median(r[0] for r in rows)
            cpu = statistics.median(r[1] for r in rows)
            print(f"| {dialect} | {ttft:.2f} ms | {ttft - native_ttft:+.2f} ms |"
                  f" {cpu * 1000:.1f} µs | {cpu / native_cpu:.2f}x |")  # fmt: skip
        print(orjson.dumps(results).decode())
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
