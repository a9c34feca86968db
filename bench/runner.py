"""One measured phase: load on one target, with CPU, memory and Redis connections around it."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field

import httpx
from redis.asyncio import Redis

from .clients import drive
from .loadgen import Spec
from .measure import Connections, ConnectionSampler, CpuMeter, RedisMeter, RedisUsage, rss_bytes
from .processes import Cluster
from .stats import Summary, by_shard

_T0 = time.monotonic()


def progress(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class Target:
    """What the clients talk to, and which processes pay for it."""

    name: str  # "direct" or "streamgate"
    port: int
    front_pid: int  # the process clients connect to: the relay or the gateway
    cpu_groups: dict[str, list[int]]

    @property
    def is_streamgate(self) -> bool:
        return self.name == "streamgate"


@dataclass
class Phase:
    summary: Summary
    cpu: dict[str, float]
    wall: float
    connections: Connections | None = None  # the gateway's Redis connections at their peak
    blocking_peak: int = 0
    rss_before: int = 0
    rss_held: int = 0
    held_streams: int = 0
    redis: RedisUsage | None = None  # Redis's own counts, all shards (Streamgate's phases)
    redis_shards: list[RedisUsage] = field(default_factory=list)  # the same, each shard
    by_shard: list[Summary] = field(default_factory=list)  # the requests, by their job's shard

    def cpu_per_1k(self, group: str) -> float | None:
        """CPU seconds per 1,000 delivered tokens."""
        if group not in self.cpu or not self.summary.tokens:
            return None
        return self.cpu[group] / self.summary.tokens * 1000

    @property
    def rss_per_stream(self) -> float | None:
        if not self.held_streams:
            return None
        return (self.rss_held - self.rss_before) / self.held_streams


async def cancel_jobs(port: int, job_ids: list[str]) -> None:
    """``DELETE /chat/<job>`` for each job, a few at a time."""
    if not job_ids:
        return
    gate = asyncio.Semaphore(20)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:

        async def cancel(job_id: str) -> None:
            async with gate:
                await http.delete(f"/chat/{job_id}")

        await asyncio.gather(*(cancel(job) for job in job_ids))
    progress(f"  cancelled {len(job_ids)} dropped jobs")


class Bench:
    """The running cluster, and how to put one measured load on one of its targets."""

    def __init__(self, cluster: Cluster, redises: list[Redis], client_procs: int) -> None:
        self.cluster = cluster
        self.redises = redises  # one client per shard, in the order of REDIS_URL
        self.redis = redises[0]  # the first shard's (the only one, unless --shards)
        self.client_procs = client_procs
        self.failed_requests = 0  # over the whole run: the services' logs are kept if any

    def targets(self, names: list[str]) -> list[Target]:
        c = self.cluster
        assert c.relay and c.gateway and c.redis and c.llm
        found = []
        if "direct" in names:
            found.append(Target("direct", c.relay_port, c.relay.pid, {"front": [c.relay.pid]}))
        if "streamgate" in names:
            groups = {
                "front": [c.gateway.pid],
                "worker": [w.pid for w in c.worker_procs],
                "redis": [p.pid for p in c.redis_procs],
            }
            found.append(Target("streamgate", c.gateway_port, c.gateway.pid, groups))
        return found

    async def phase(
        self,
        target: Target,
        spec: Spec,
        procs: int | None = None,
        close_when_held: bool = True,
    ) -> Phase:
        """Run one load on one target. With ``spec.ready_on`` set, once every stream is ready
        the front process's RSS and Redis connections are read with them all open; then
        they are dropped, or left to run to their end (``close_when_held=False``)."""
        c = self.cluster
        assert c.llm is not None
        groups = {**target.cpu_groups, "llm": [c.llm.pid]}
        sampler = (
            ConnectionSampler(
                self.redis, target.front_pid, c.redis_port, max(0.25, spec.streams / 2000)
            )
            if target.is_streamgate
            else None
        )
        result = Phase(Summary(), {}, 0.0)
        result.rss_before = rss_bytes(target.front_pid)
        redis_meters = (
            [await RedisMeter(redis).start() for redis in self.redises]
            if target.is_streamgate
            else []
        )
        meter = CpuMeter(groups).start()
        if sampler is not None:
            sampler.start()

        async def held(open_streams: int) -> None:
            await asyncio.sleep(0.5)  # let the last streams' first writes settle
            result.rss_held = rss_bytes(target.front_pid)
            result.held_streams = open_streams
            if sampler is not None:
                await sampler.sample()
            progress(
                f"  {open_streams} streams open on the {target.name} front: RSS"
                f" {result.rss_before / 2**20:.1f} -> {result.rss_held / 2**20:.1f} MiB"
            )

        outcome = await drive(
            spec,
            procs or self.client_procs,
            on_ready=held if spec.ready_on else None,
            close_after_ready=close_when_held,
        )
        result.cpu = meter.stop()
        if redis_meters:
            result.redis_shards = [await meter.stop() for meter in redis_meters]
            result.redis = RedisUsage.combined(result.redis_shards)
        result.cpu["clients"] = outcome.client_cpu_s
        result.wall = meter.wall
        result.summary.add(outcome.requests)
        if target.is_streamgate:
            result.by_shard = by_shard(outcome.requests, len(self.redises))
        self.failed_requests += result.summary.failed
        if target.is_streamgate:
            # Dropped streams' jobs would run on for DISCONNECT_GRACE_S: cancel them, as a
            # client may, so the next phase starts on an idle worker.
            dropped = [r["job_id"] for r in outcome.requests if r["closed_by_bench"]]
            await cancel_jobs(target.port, [job for job in dropped if job])
        if sampler is not None:
            result.connections = await sampler.stop()
            result.blocking_peak = sampler.peak_blocking
        c.check_alive()
        return result

    async def drain(self, patience_s: float = 30.0) -> None:
        """Wait until the demo LLM has no open stream: the last phase's jobs have ended."""
        deadline = time.monotonic() + patience_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self.cluster.llm_open_streams) == 0:
                await asyncio.sleep(0.2)
                return
            await asyncio.sleep(0.1)
        progress(f"warning: upstream streams still open after {patience_s:.0f} s")

    async def idle_cpu(self, seconds: float) -> dict[str, float]:
        """CPU % of each process over ``seconds`` with no load at all."""
        c = self.cluster
        assert c.gateway and c.relay and c.redis
        groups = {
            "relay": [c.relay.pid],
            "gateway": [c.gateway.pid],
            "redis": [p.pid for p in c.redis_procs],
            **{w.name: [w.pid] for w in c.worker_procs},
        }
        meter = CpuMeter(groups).start()
        await asyncio.sleep(seconds)
        used = meter.stop()
        return {name: used[name] / meter.wall * 100 for name in groups}
