"""A Redis Cluster as shards: ``redis+cluster://[user:password@]host:port[,host:port...]``.

Each shard is a hash tag: every key of the shard carries it (``Keys``), so all of them live
in one slot, and the library's functions and arq's transactions, which touch several at
once, work as on a Redis of its own. The tags are chosen so that their slots spread evenly
over the 16384: the i-th shard's slot lies in the i-th of ``shards`` equal ranges, and a
cluster whose masters own equal ranges holds equal numbers of shards.

A shard's clients connect to the master that owns its slot, as the cluster says when a
connection is made (``CLUSTER SLOTS``, asked again when the answer is a second old): a
failover is followed by the next connection, as with Sentinel. Commands then go to that
one node as to a plain Redis, blocking reads and pipelines included, which redis-py's
cluster client does not offer for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError, ResponseError

from .cursors import MAX_SHARDS
from .held_connection import NotSent
from .urls import host_ports

SCHEME = "redis+cluster"
DEFAULT_SHARDS = 12  # spreads evenly over 1, 2, 3, 4, 6 or 12 masters
TABLE_TTL_S = 1.0  # how long an answer of CLUSTER SLOTS is taken for the truth


@dataclass(frozen=True)
class ClusterTarget:
    seeds: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    shards: int


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme == SCHEME


def cluster_target(urls: list[str]) -> ClusterTarget:
    """The cluster that these ``redis+cluster://`` URLs name together (each may list seeds;
    credentials and ``?shards=`` from the first); ValueError saying what is wrong."""
    seeds: list[tuple[str, int]] = []
    for url in urls:
        parts = urlsplit(url)
        seeds += host_ports(parts.netloc.rsplit("@", 1)[-1], "cluster node")
        if parts.path.strip("/") not in ("", "0"):
            raise ValueError("a Redis Cluster has database 0 only: drop the path")
    first = urlsplit(urls[0])
    options = parse_qs(first.query)
    unknown = set(options) - {"shards"}
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}: only ?shards=N")
    shards_text = options.get("shards", [str(DEFAULT_SHARDS)])[-1]
    if not shards_text.isdigit() or not 1 <= int(shards_text) <= MAX_SHARDS:
        raise ValueError(f"shards={shards_text!r}: must be a number from 1 to {MAX_SHARDS}")
    username = unquote(first.username) if first.username else None
    password = unquote(first.password) if first.password else None
    return ClusterTarget(tuple(seeds), username, password, int(shards_text))


def shard_tags(count: int) -> list[str]:
    """One hash tag per shard, the i-th hashing into the i-th of ``count`` equal slot
    ranges: the same on every process."""
    tags = []
    for index in range(count):
        low = index * REDIS_CLUSTER_HASH_SLOTS // count
        high = (index + 1) * REDIS_CLUSTER_HASH_SLOTS // count
        attempt = 0
        while not low <= key_slot(f"s{index}.{attempt}".encode()) < high:
            attempt += 1
        tags.append(f"s{index}.{attempt}")
    return tags


def tag_slot(tag: str) -> int:
    return key_slot(tag.encode())


class SlotOwners:
    """Which master owns which slot, as the cluster last said."""

    def __init__(self, target: ClusterTarget) -> None:
        self.target = target
        self._nodes: list[tuple[str, int]] = list(target.seeds)
        self._ranges: list[tuple[int, int, tuple[str, int]]] = []
        self._read_at = -TABLE_TTL_S
        self.generation = 0  # counts forget(): connections made before it connect again

    def forget(self) -> None:
        """A slot moved, or a master failed: every connection connects again, and the
        next asks the cluster where."""
        self._read_at = -TABLE_TTL_S
        self.generation += 1

    async def owner(self, slot: int) -> tuple[str, int]:
        if time.monotonic() - self._read_at > TABLE_TTL_S:
            await self._read()
        for low, high, node in self._ranges:
            if low <= slot <= high:
                return node
        raise RedisConnectionError(f"no node of the Redis Cluster serves slot {slot}")

    async def _read(self) -> None:
        """Ask the nodes in turn (those seen last first, then the seeds) for the slots."""
        errors = []
        for host, port in dict.fromkeys([*self._nodes, *self.target.seeds]):
            node = Redis(
                host=host,
                port=port,
                username=self.target.username,
                password=self.target.password,
                socket_connect_timeout=2,
                socket_timeout=2,
            )
            try:
                slots: list[Any] = await node.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
            except (RedisError, OSError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            finally:
                await node.aclose()
            ranges = []
            for entry in slots:
                master = entry[2]
                address = master[0].decode() if isinstance(master[0], bytes) else master[0]
                ranges.append((int(entry[0]), int(entry[1]), (address or host, int(master[1]))))
            self._ranges = ranges
            self._nodes = list(dict.fromkeys(node for _, _, node in ranges))
            self._read_at = time.monotonic()
            return
        raise RedisConnectionError("no node of the Redis Cluster answers: " + "; ".join(errors))


_owners: dict[ClusterTarget, SlotOwners] = {}


def owners_of(target: ClusterTarget) -> SlotOwners:
    """One table per cluster and process."""
    return _owners.setdefault(target, SlotOwners(target))


# Replies that say the command did not run on this node, as its slot is (or is going)
# elsewhere: the connection drops and the next one asks the cluster where.
_ELSEWHERE = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN", "UNBLOCKED")


class SlotOwnerConnection(Connection):
    """A connection to whichever master owns ``slot`` when it connects; a reply that the
    slot is elsewhere drops it, as ``NotSent``: the command did not run."""

    def __init__(self, *, owners: SlotOwners, slot: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owners = owners
        self.slot = slot
        self._generation = owners.generation

    async def connect(self) -> None:
        if not self.is_connected:
            self._generation = self.owners.generation
            self.host, self.port = await self.owners.owner(self.slot)
        await super().connect()  # type: ignore[no-untyped-call]

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        if self.is_connected and self._generation != self.owners.generation:
            await self.disconnect(nowait=True)  # made before a slot moved: ask again
        await super().send_packed_command(*args, **kwargs)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            # READONLY: a master turned replica by a failover
            if not (isinstance(exc, ReadOnlyError) or str(exc).startswith(_ELSEWHERE)):
                raise
            self.owners.forget()
            await self.disconnect(nowait=True)
            raise NotSent(f"slot {self.slot} is not served here ({exc})") from exc
