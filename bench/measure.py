"""What the bench reads from the outside: /proc for CPU, memory and sockets, Redis for clients.

Nothing here asks the services for their own figures: every number comes from the kernel or
from Redis, so the bench measures any build of Streamgate the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces; the fields after its closing parenthesis do not.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory (VmRSS) of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, every process), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds spent by groups of processes between ``start`` and ``stop``."""

    def __init__(self, groups: Mapping[str, Sequence[int]]) -> None:
        self.groups = groups
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.started_at = 0.0
        self.wall = 0.0

    def _read(self) -> dict[str, float]:
        used = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.groups.items()}
        used["machine"] = machine_busy_seconds()
        return used

    def start(self) -> CpuMeter:
        self.before = self._read()
        self.started_at = time.monotonic()
        return self

    def stop(self) -> dict[str, float]:
        self.after = self._read()
        self.wall = time.monotonic() - self.started_at
        return self.used

    @property
    def used(self) -> dict[str, float]:
        return {name: self.after[name] - self.before[name] for name in self.after}


@dataclass
class RedisUsage:
    """What Redis itself counted between two reads: its CPU (``INFO cpu``) and, per command,
    calls and microseconds (``INFO commandstats``). A command a function calls is counted
    both on its own line and inside the ``fcall`` that called it."""

    cpu_s: float = 0.0
    commands: dict[str, tuple[int, int]] = field(default_factory=dict)  # name: (calls, µs)
    clients: int = 0  # connected_clients at the second read (the bench's own included)

    @classmethod
    def combined(cls, usages: Iterable[RedisUsage]) -> RedisUsage:
        """Several shards' counts as one Redis's: CPU, calls and µs summed."""
        total = cls()
        for usage in usages:
            total.cpu_s += usage.cpu_s
            total.clients += usage.clients
            for name, (calls, usec) in usage.commands.items():
                calls0, usec0 = total.commands.get(name, (0, 0))
                total.commands[name] = (calls0 + calls, usec0 + usec)
        return total

    def top(self, tokens: int, n: int = 8) -> list[tuple[str, float, float]]:
        """The ``n`` costliest commands: (name, µs per token, calls per token)."""
        ranked = sorted(self.commands.items(), key=lambda kv: -kv[1][1])[:n]
        return [(name, usec / tokens, calls / tokens) for name, (calls, usec) in ranked]


class RedisMeter:
    """Redis's own CPU and command statistics around a phase (the bench owns this Redis)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.before = RedisUsage()

    async def _read(self) -> RedisUsage:
        cpu = await self.redis.info("cpu")
        stats = await self.redis.info("commandstats")
        clients = await self.redis.info("clients")
        commands = {
            name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in stats.items()
        }
        cpu_s = float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
        return RedisUsage(cpu_s, commands, int(clients["connected_clients"]))

    async def start(self) -> RedisMeter:
        self.before = await self._read()
        return self

    async def stop(self) -> RedisUsage:
        after = await self._read()
        delta = {}
        for name, (calls, usec) in after.commands.items():
            calls0, usec0 = self.before.commands.get(name, (0, 0))
            if calls > calls0:
                delta[name] = (calls - calls0, usec - usec0)
        return RedisUsage(after.cpu_s - self.before.cpu_s, delta, after.clients)


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(fd_dir / fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def local_ports_to(pid: int, remote_port: int) -> set[int]:
    """Local ports of ``pid``'s TCP connections to ``remote_port`` (its Redis clients)."""
    inodes = _socket_inodes(pid)
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError):
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            for line in lines:
                parts = line.split()
                if int(parts[2].rsplit(":", 1)[1], 16) == remote_port and parts[9] in inodes:
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


@dataclass
class Connections:
    """One process's connections as Redis lists them, by the last command each ran."""

    total: int = 0
    by_command: dict[str, int] = field(default_factory=dict)

    @property
    def blocking_reads(self) -> int:
        return sum(n for cmd, n in self.by_command.items() if cmd in ("xread", "xreadgroup"))


async def redis_connections(redis: Redis, pid: int, redis_port: int) -> Connections:
    """The Redis connections ``pid`` holds, matched to ``CLIENT LIST`` by local port."""
    ports = local_ports_to(pid, redis_port)
    found = Connections()
    for client in await redis.client_list():
        port = int(str(client["addr"]).rsplit(":", 1)[1])
        if port in ports:
            found.total += 1
            cmd = str(client.get("cmd", "?"))
            found.by_command[cmd] = found.by_command.get(cmd, 0) + 1
    return found


class ConnectionSampler:
    """Peak Redis connections of one process while a phase runs (sampled, not traced)."""

    def __init__(self, redis: Redis, pid: int, redis_port: int, every_s: float = 0.5) -> None:
        self.redis = redis
        self.pid = pid
        self.redis_port = redis_port
        self.every_s = every_s
        self.peak = Connections()
        self.peak_blocking = 0
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> Connections:
        now = await redis_connections(self.redis, self.pid, self.redis_port)
        if now.total > self.peak.total:
            self.peak = now
        self.peak_blocking = max(self.peak_blocking, now.blocking_reads)
        return now

    async def _loop(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.every_s)

    def start(self) -> ConnectionSampler:
        self._task = asyncio.create_task(self._loop())
        return self

    async def stop(self) -> Connections:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.sample()
        return self.peak


class EnqueueProbe:
    """Enqueue -> start of each job, timed on the bench's clock from Redis keyspace events.

    Every job's stream gets its ``queued`` entry when the gateway enqueues it and its
    ``started`` entry when a worker claims it; with keyspace notifications on (the bench
    owns this Redis) each XADD reaches us at once, so the gap between a stream's first
    and second XADD is the pickup delay, with microsecond resolution instead of the
    millisecond steps of stream ids. The notifications cost Redis a little, so the probe
    runs only during the one-client phase.
    """

    def __init__(self, redis: Redis, db: int = 0) -> None:
        self.redis = redis
        self.pattern = f"__keyspace@{db}__:sg:*:events"
        self.delays: list[float] = []
        self._first: dict[bytes, float] = {}
        self._seen: dict[bytes, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._pubsub = redis.pubsub()

    async def start(self) -> EnqueueProbe:
        await self.redis.config_set("notify-keyspace-events", "Kt")
        await self._pubsub.psubscribe(self.pattern)
        self._task = asyncio.create_task(self._loop())
        return self

    async def _loop(self) -> None:
        while True:
            message = await self._pubsub.get_message(timeout=1.0)
            now = time.perf_counter()
            if message is None or message["type"] != "pmessage" or message["data"] != b"xadd":
                continue
            channel: bytes = message["channel"]
            count = self._seen[channel] = self._seen.get(channel, 0) + 1
            if count == 1:
                self._first[channel] = now
            elif count == 2:
                self.delays.append(now - self._first.pop(channel))

    async def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._pubsub.punsubscribe(self.pattern)
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.redis.config_set("notify-keyspace-events", "")
        return self.delays
