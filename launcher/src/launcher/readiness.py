"""Is it up yet: ports, HTTP and Redis, asked the way a client would."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.redis_conn import connect
from shared.settings import without_password
from shared.shards import ShardSpec, shard_specs

from .errors import LaunchError

POLL_S = 0.05


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``port`` (as uvicorn does, with SO_REUSEADDR); a
    host it could never listen on is a ``LaunchError`` naming ``HOST``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            if exc.errno == errno.EACCES:
                raise LaunchError(
                    f"cannot listen on port {port}: {exc.strerror}; a port under 1024 needs"
                    " privileges: pick another with --port N"
                ) from None
            raise LaunchError(
                f"cannot listen on HOST={host} port {port}: {exc.strerror or exc}; set HOST to"
                " an address of this machine (127.0.0.1, 0.0.0.0 for every interface)"
            ) from None
        return True


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def answers_http(url: str) -> None:
    """Until ``url`` answers 200."""
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(POLL_S)


async def upstream_problem(base_url: str, api_key: str | None) -> str | None:
    """Why the configured model's ``GET /models`` fails, or None when it answers."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(base_url.rstrip("/") + "/models", headers=headers)
    except httpx.HTTPError as exc:
        return f"OPENAI_BASE_URL {base_url} does not answer ({exc or type(exc).__name__})"
    if response.status_code >= 400:
        return f"OPENAI_BASE_URL {base_url} answered GET /models with {response.status_code}"
    return None


async def redis_answers(url: str) -> None:
    """Until the Redis at ``url`` answers PING."""
    client = Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        while True:
            with contextlib.suppress(RedisError, OSError):
                if await client.ping():
                    return
            await asyncio.sleep(POLL_S)
    finally:
        await client.aclose()


async def check_redis_url(redis_url: str) -> None:
    """REDIS_URL, once: each shard it names must answer now, or the run stops saying so."""
    try:
        specs = shard_specs(redis_url)
    except ValueError as exc:
        raise LaunchError(f"REDIS_URL is not a Redis URL ({exc})") from None
    for spec in specs:
        await _check_one(spec, "REDIS_URL" if len(specs) == 1 else "the REDIS_URL shard")


async def _check_one(spec: ShardSpec, what: str) -> None:
    shown = spec.name if spec.slot is not None else without_password(spec.url)
    try:
        client = connect(spec.url, spec.slot, socket_connect_timeout=3, socket_timeout=3)
    except ValueError as exc:
        raise LaunchError(f"{what} {shown} is not a Redis URL ({exc})") from None
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        raise LaunchError(
            f"{what} {shown} does not answer ({exc}): start that Redis, or unset REDIS_URL "
            "to run a private one"
        ) from None
    finally:
        await client.aclose()
