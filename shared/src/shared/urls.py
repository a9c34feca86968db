"""Reading ``REDIS_URL``: the shards it lists, and the hosts a URL names. Kept apart from
what connects, so that settings, shards and clients all read a URL the same way."""

from __future__ import annotations

import re

# A comma starts the next shard's URL only where a scheme follows it: a Sentinel URL lists
# its sentinels with commas too.
_NEXT_URL = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(redis_url: str) -> list[str]:
    """The shards' URLs that ``REDIS_URL`` lists, in order."""
    return [url for url in _NEXT_URL.split(redis_url.strip()) if url]


def host_ports(hosts: str, what: str) -> list[tuple[str, int]]:
    """The ``host:port`` pairs of a URL's comma-separated hosts (``[::1]:26379`` for an
    IPv6 address); ValueError naming ``what`` each is if one is not."""
    pairs = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{what} {host!r} is not host:port")
        pairs.append((name.strip("[]"), int(port)))
    return pairs
