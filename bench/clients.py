"""Driving load generator processes from the bench: split, start, wait for READY, collect."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import orjson

from .loadgen import Spec
from .processes import die_with_parent

Results = list[dict[str, Any]]


@dataclass
class Outcome:
    requests: Results = field(default_factory=list)
    client_cpu_s: float = 0.0  # the load generators' own CPU, for scale


async def drive(
    spec: Spec,
    procs: int = 1,
    on_ready: Callable[[int], Awaitable[None]] | None = None,
    close_after_ready: bool = False,
) -> Outcome:
    """Run ``spec`` split over ``procs`` client processes; one summary per request.

    With ``spec.ready_on`` set, ``on_ready(open_streams)`` runs once every process reports
    all its streams ready (the bench measures then); ``close_after_ready`` then drops them.
    """
    procs = max(1, min(procs, spec.streams))
    shares = [spec.streams // procs + (1 if i < spec.streams % procs else 0) for i in range(procs)]
    children = []
    for i, streams in enumerate(shares):
        child_spec = replace(
            spec,
            streams=streams,
            label=f"{spec.label}{i}" if procs > 1 else spec.label,
            ramp_per_s=spec.ramp_per_s / procs,
        )
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.loadgen",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 30,  # the RESULT line of thousands of streams is long
            preexec_fn=die_with_parent,
        )
        assert child.stdin is not None
        child.stdin.write(orjson.dumps(asdict(child_spec)) + b"\n")
        await child.stdin.drain()
        children.append(child)

    ready = [asyncio.Event() for _ in children]
    open_streams = [0 for _ in children]
    outcome = Outcome()

    async def collect(index: int, child: asyncio.subprocess.Process) -> None:
        assert child.stdout is not None
        while line := await child.stdout.readline():
            if line.startswith(b"READY"):
                open_streams[index] = int(line.split()[3])
                ready[index].set()
            elif line.startswith(b"RESULT "):
                result = orjson.loads(line[7:])
                outcome.requests.extend(result["requests"])
                outcome.client_cpu_s += result["cpu_s"]
        ready[index].set()
        if await child.wait() != 0:
            raise RuntimeError(f"load generator {index} exited with {child.returncode}")

    collectors = [asyncio.create_task(collect(i, c)) for i, c in enumerate(children)]
    try:
        if spec.ready_on is not None:
            await asyncio.gather(*(event.wait() for event in ready))
            if on_ready is not None:
                await on_ready(sum(open_streams))
            if close_after_ready:
                for child in children:
                    assert child.stdin is not None
                    # A child whose streams all ended already has exited: nothing to close.
                    with contextlib.suppress(ConnectionError):
                        child.stdin.write(b"close\n")
                        await child.stdin.drain()
        for child in children:
            assert child.stdin is not None
            child.stdin.close()
        await asyncio.gather(*collectors)
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
        for task in collectors:
            task.cancel()
        await asyncio.gather(*collectors, return_exceptions=True)
    return outcome
