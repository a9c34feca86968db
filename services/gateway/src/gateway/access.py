"""Who may call the API, and how much: keys, per-key job ownership, rate and stream limits.

- Keys come from ``Authorization: Bearer`` or, because ``EventSource`` cannot send headers,
  an ``access_token`` query parameter. Each is compared with every configured key in
  constant time. A job remembers a digest of the key that created it (never the key): a
  request with another key is told the job does not exist, so ids leak nothing.
- The rate limit counts chats (not reads) per key, or per client address without keys, over
  the last minute (a sliding window) in Redis, so it holds across gateway replicas.
- The cap on open streams per key (per client address without keys) is counted in this
  gateway process: a restart forgets nothing that still exists, which a count in Redis
  could not promise after a crash. A stream holds its slot from the handler's check to its
  last byte.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request

from shared.held_connection import NotSent

from .errors import ApiError, RateLimited, Unauthorized
from .shards import Shards

logger = logging.getLogger(__name__)

WINDOW_MS = 60_000


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Access:
    def __init__(
        self, shards: Shards, keys: list[str], rate_per_min: int, max_streams_per_key: int
    ) -> None:
        self.shards = shards
        self._digests = [_digest(k) for k in keys]
        self.rate_per_min = rate_per_min
        self.max_streams = max_streams_per_key
        self._streams: Counter[str] = Counter()

    @property
    def keys_required(self) -> bool:
        return bool(self._digests)

    def identify(self, request: Request) -> str:
        """The caller's identity: a digest of its key, or "" when no keys are configured."""
        if not self._digests:
            return ""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else ""
        # The first value counts, as for every parameter (inputs.query_params).
        key = key or next(iter(request.query_params.getlist("access_token")), "")
        if not key:
            raise Unauthorized(
                "this gateway needs an API key: send 'Authorization: Bearer <key>'"
                " or ?access_token=<key>"
            )
        digest = _digest(key)
        matched = False
        for known in self._digests:  # no early exit: the time taken says nothing
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise Unauthorized("that API key is not valid for this gateway")
        return digest.hex()[:32]

    @asynccontextmanager
    async def count_chat(self, request: Request, identity: str) -> AsyncIterator[None]:
        """Count one new chat against the rate limit (429 with Retry-After past it) while
        the block enqueues it; a chat the block refuses (409, 503) is not counted."""
        if not self.rate_per_min:
            yield
            return
        who = identity or f"addr:{request.client.host if request.client else 'unknown'}"
        shard = self.shards.home(who)  # each caller's window in one place
        key = shard.log.keys.rate(who)
        member = secrets.token_hex(8)
        # A sliding window on Redis's clock (the library's ``take``): the chats of the last
        # minute, one member each, so a burst across a minute boundary counts as one minute.
        several = len(self.shards) > 1
        try:
            # Skippable with other shards: not a wait for a down shard's connect timeout
            # per chat.
            taken, retry_after = await shard.attempt(
                lambda: shard.log.functions.call(
                    "take", [key], [WINDOW_MS, self.rate_per_min, member]
                ),
                skippable=several,
            )
        except (NotSent, RedisTimeoutError) as exc:
            if not several:
                raise  # no chat can start anyway: 503
            # The other shards take chats: a window out of reach does not stop its caller.
            logger.warning("rate limit not counted: %s", exc)
            taken, retry_after = True, 0
            member = ""
        if not taken:
            raise RateLimited(
                f"rate limit reached: {self.rate_per_min} chats per minute"
                f" (RATE_LIMIT_PER_MIN); retry in {retry_after} s",
                int(retry_after),
            )
        try:
            yield
        except ApiError:
            if member:
                await shard.arq.zrem(key, member)
            raise

    def take_stream_slot(self, request: Request, identity: str) -> Callable[[], None]:
        """Count one open stream for the caller (its key, or its address without keys) from
        now until the returned release is called; 429 if it holds as many as it may. Taken
        in the handler, before any await, so concurrent requests cannot all pass the check."""
        if not self.max_streams:
            return _nothing
        holder = identity or f"addr:{request.client.host if request.client else 'unknown'}"
        if self._streams[holder] >= self.max_streams:
            raise RateLimited(
                f"too many open streams for this {'key' if identity else 'address'}"
                f" ({self.max_streams}, MAX_STREAMS_PER_KEY); close one and retry",
                5,
            )
        self._streams[holder] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._streams[holder] -= 1
                if not self._streams[holder]:
                    del self._streams[holder]

        return release


def _nothing() -> None:
    pass
