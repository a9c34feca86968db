"""Who may call the API, and how much: keys, per-key job ownership, rate and stream limits.

- Keys come from ``Authorization: Bearer`` or, because ``EventSource`` cannot send headers,
  an ``access_token`` query parameter. Each is compared with every configured key in
  constant time. A job remembers a digest of the key that created it (never the key): a
  request with another key is told the job does not exist, so ids leak nothing.
- The rate limit counts chats (not reads) per key, or per client address without keys, in
  a one-minute window in Redis, so it holds across gateway replicas.
- The cap on open streams per key is counted in this gateway process: a restart forgets
  nothing that still exists, which a count in Redis could not promise after a crash.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from redis.asyncio import Redis
from starlette.requests import Request

from .errors import ApiError, RateLimited, Unauthorized


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Access:
    def __init__(
        self, redis: Redis, keys: list[str], rate_per_min: int, max_streams_per_key: int
    ) -> None:
        self.redis = redis
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
        key = key or request.query_params.get("access_token", "")
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
        now = time.time()
        window = int(now // 60)
        key = f"sg:rate:{{{who}}}:{window}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 61)
            count, _ = await pipe.execute()
        if count > self.rate_per_min:
            retry_after = max(1, int((window + 1) * 60 - now) + 1)
            raise RateLimited(
                f"rate limit reached: {self.rate_per_min} chats per minute"
                f" (RATE_LIMIT_PER_MIN); retry in {retry_after} s",
                retry_after,
            )
        try:
            yield
        except ApiError:
            await self.redis.decr(key)
            raise

    def check_stream_slot(self, identity: str) -> None:
        """429 if ``identity`` already holds as many open streams as it may."""
        if self.max_streams and self._streams[identity] >= self.max_streams:
            raise RateLimited(
                f"too many open streams for this key ({self.max_streams},"
                " MAX_STREAMS_PER_KEY); close one and retry",
                5,
            )

    @contextmanager
    def stream_slot(self, identity: str) -> Iterator[None]:
        """Count one open stream for ``identity`` while the block runs."""
        self._streams[identity] += 1
        try:
            yield
        finally:
            self._streams[identity] -= 1
            if not self._streams[identity]:
                del self._streams[identity]
