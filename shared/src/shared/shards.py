"""Shards: ``REDIS_URL`` may list several Redis primaries, and each job lives wholly in one.

Every job's keys (queue entry, stream, meta, liveness) are in the shard chosen when it is
created, so every function of the library stays within one Redis. The first two hex digits
of a job id name its shard's place in the list (``cursors.new_job_id``): any gateway finds
any job from its id or a cursor alone. Shards are added at the end of the list and never
reordered; a job id names its shard modulo the list's length, so the ids of a one-Redis
deployment (any first digits) all stay in that Redis.

What has no job id lives in the shard its own name hashes to (``home``): a session's turns
and lock (its jobs go there too, so a turn is written with its job's final event), an AI SDK
chat's active answer, a caller's rate-limit window.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import RedisError

from .cluster import cluster_target, is_cluster_url, shard_tags, tag_slot
from .keys import Keys
from .redis_conn import connect
from .urls import split_urls

CHECK_PLACES_S = 5.0


@dataclass(frozen=True)
class ShardSpec:
    """Where one shard is: the URL its clients connect to, and its key names."""

    index: int
    url: str
    keys: Keys
    slot: int | None = None  # a Cluster's shard: its tag's slot
    count: int = 1  # the shards REDIS_URL names

    @property
    def name(self) -> str:
        """The shard as operators see it (logs, ``/readyz``, which anyone may ask): its
        scheme, hosts and path, never a user, password or option."""
        parts = urlsplit(split_urls(self.url)[0])
        shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=""))
        return shown if self.slot is None else f"{shown} shard {self.index} (slot {self.slot})"

    @property
    def suffix(self) -> str:
        """What tells its tasks apart from other shards' (``[1]``): none when it is alone."""
        return f"[{self.index}]" if self.count > 1 else ""

    @property
    def where(self) -> str:
        """What a log line about it adds (`` redis://b:6379/0``): none when it is alone."""
        return f" {self.name}" if self.count > 1 else ""


def shard_specs(redis_url: str) -> list[ShardSpec]:
    """The shards ``REDIS_URL`` names, in order."""
    urls = split_urls(redis_url)
    if not is_cluster_url(urls[0]):
        return [ShardSpec(i, url, Keys(), None, len(urls)) for i, url in enumerate(urls)]
    tags = shard_tags(cluster_target(urls).shards)
    return [
        ShardSpec(i, redis_url, Keys(tag), tag_slot(tag), len(tags)) for i, tag in enumerate(tags)
    ]


async def check_places(specs: list[ShardSpec]) -> list[str]:
    """Each shard that answers now must hold its own place in the list (the first process
    to reach it records it): a list reordered, or a Redis listed as another shard, would
    make job ids and sessions name the wrong Redis. What is wrong, in words; shards that do
    not answer are checked by no one (their processes reach them later)."""
    count = len(specs)

    async def held_place(spec: ShardSpec) -> tuple[str, str | None]:
        place = f"{spec.index} of {count}" if spec.slot is not None else str(spec.index)
        client = connect(spec.url, spec.slot, socket_connect_timeout=2, socket_timeout=2)
        try:
            held = await client.set(spec.keys.place, place, nx=True, get=True)
        except (RedisError, OSError):
            held = None
        finally:
            await client.aclose()
        return place, held.decode() if held is not None else None

    try:  # all at once, and a start waits a few seconds at most for shards that hang
        async with asyncio.timeout(CHECK_PLACES_S):
            places = await asyncio.gather(*(held_place(spec) for spec in specs))
    except TimeoutError:
        return []
    problems = []
    for spec, (place, held) in zip(specs, places, strict=True):
        if held is not None and held != place:
            problems.append(
                f"{spec.name} is listed as shard {place} but holds the jobs of shard"
                f" {held}: keep each shard's place (add new ones at the end"
                f"{'; the same ?shards=' if spec.slot is not None else ''}), or, for a"
                f" Redis that no longer holds anything of this deployment, DEL {spec.keys.place}"
            )
    return problems


def require_places(redis_url: str) -> None:
    """``check_places`` before a process starts: a shard out of place stops it, saying so."""
    problems = asyncio.run(check_places(shard_specs(redis_url)))
    if problems:
        sys.exit("Streamgate cannot start: REDIS_URL\n  " + "\n  ".join(problems))


def shard_of(job_id: str, count: int) -> int:
    """The shard (its place in the list) of a well-formed job id."""
    return int(job_id[:2], 16) % count


def home(name: str, count: int) -> int:
    """The shard a session, chat or caller lives in: the same on every process."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count
