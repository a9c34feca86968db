"""Every setting of Streamgate, read once from the environment and validated at start.

A bad value stops the process before it serves anything, with a message that names the
variable: a typo in production should fail loudly at deploy time, not at the first chat.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .urls import split_urls

# Finite and at most a year: "inf" would overflow timers deep inside asyncio and Redis.
PositiveSeconds = Annotated[float, Field(gt=0, le=365 * 24 * 3600, allow_inf_nan=False)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    redis_url: str = "redis://localhost:6379/0"
    openai_base_url: str = "http://127.0.0.1:8001/v1"
    openai_api_key: str = ""
    openai_model: str = "streamgate-demo"
    openai_max_retries: Annotated[int, Field(ge=0, le=10)] = 2
    cors_allow_origins: str = "*"
    max_prompt_chars: Annotated[int, Field(gt=0)] = 32000
    ping_interval_s: PositiveSeconds = 15.0
    worker_lost_timeout_s: PositiveSeconds = 30.0
    upstream_idle_timeout_s: PositiveSeconds = 30.0
    queue_timeout_s: PositiveSeconds = 60.0
    disconnect_grace_s: PositiveSeconds = 10.0
    # Fractions too, as every *_S setting takes: keys expire in whole seconds, rounded up.
    stream_retention_s: Annotated[float, Field(gt=0, le=365 * 24 * 3600, allow_inf_nan=False)] = (
        3600
    )
    max_queued_jobs: Annotated[int, Field(gt=0)] = 1000
    api_keys: str = ""
    rate_limit_per_min: Annotated[int, Field(ge=0)] = 0
    # Not in the contract's table; each is documented in the README's one table.
    worker_max_jobs: Annotated[int, Field(gt=0)] = 200
    token_gather_ms: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = 10.0
    job_timeout_s: PositiveSeconds = 900.0
    shutdown_grace_s: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 20.0
    relay_buffer_events: Annotated[int, Field(gt=0)] = 1024
    relay_buffer_bytes: Annotated[int, Field(ge=4096)] = 131_072
    # Streams one blocking XREAD covers; a gateway relaying more waits on the doorbell
    # (keys.ACTIVITY) and reads only the streams that changed: Redis spends ~2.4 µs per
    # stream named in each XREAD, 24 ms per call at 10,000.
    relay_multiplex_max: Annotated[int, Field(ge=0)] = 512
    relay_gather_ms: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = 5.0
    # The gather windows apply only to a process carrying this many streams of a shard: a
    # few chats leave Redis idle, and then latency is all that counts.
    gather_from_streams: Annotated[int, Field(ge=0)] = 32
    send_timeout_s: PositiveSeconds = 30.0
    # Proxies whose X-Forwarded-For the gateway believes; empty: none, so no client can pose
    # as other addresses to get past the per-address caps.
    forwarded_allow_ips: str = ""
    max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 32_768
    header_timeout_s: PositiveSeconds = 10.0
    body_timeout_s: PositiveSeconds = 30.0
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    expose_error_details: bool = False  # upstream URLs and error bodies in error events
    log_prompts: bool = False  # log prompts and answers (debugging only: they may be private)
    api_keys_file: str = ""  # a file of keys, one a line, added to API_KEYS
    # Open streams per key (per client address without keys), per gateway; 0 is off.
    max_streams_per_key: Annotated[int, Field(ge=0)] = 1000
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9100  # worker metrics; 0 is off
    roles_file: str = ""  # empty: the built-in roles (shared/roles.toml)
    tools: str = "all"  # "all", "none", or comma-separated tool names
    tools_file: str = ""  # TOML: Python tool modules and MCP servers (docs/tools.md)
    tool_timeout_s: PositiveSeconds = 10.0
    tool_output_max_chars: Annotated[int, Field(ge=100, le=10_000_000)] = 20_000
    agent: str = ""  # package.module:function, an async generator of events; empty: built-in
    max_tool_rounds: Annotated[int, Field(ge=1, le=20)] = 4
    session_max_turns: Annotated[int, Field(ge=1)] = 20
    session_max_chars: Annotated[int, Field(ge=1)] = 24000
    session_retention_s: Annotated[int, Field(gt=0, le=365 * 24 * 3600)] = 7 * 24 * 3600

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        from .cluster import cluster_target, is_cluster_url
        from .cursors import MAX_SHARDS

        urls = split_urls(value)
        if not urls:
            raise ValueError("names no Redis")
        clusters = [url for url in urls if is_cluster_url(url)]
        if clusters:
            if len(clusters) < len(urls):
                raise ValueError(
                    "names a Redis Cluster and other Redis servers: shards are either a"
                    " Cluster's or a list of Redis primaries, not both"
                )
            cluster_target(urls)  # raises ValueError saying what is wrong
            return value
        if len(urls) > MAX_SHARDS:
            raise ValueError(f"lists {len(urls)} Redis shards; at most {MAX_SHARDS}")
        if len(set(urls)) < len(urls):
            raise ValueError("lists one Redis twice: each shard must be its own Redis")
        for place, url in enumerate(urls):
            try:
                _check_redis_url(url)
            except ValueError as exc:
                if len(urls) == 1:
                    raise
                raise ValueError(f"shard {place} ({without_password(url)}): {exc}") from None
        return value

    @field_validator("openai_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return level

    @field_validator("roles_file")
    @classmethod
    def _roles_file(cls, value: str) -> str:
        from .roles import load_roles  # a roles file that does not load stops the start too

        load_roles(value or None)
        return value

    @field_validator("agent")
    @classmethod
    def _agent(cls, value: str) -> str:
        module, _, function = value.strip().partition(":")
        if value.strip() and not (module and function.isidentifier()):
            raise ValueError("must be package.module:function")
        return value.strip()

    @field_validator("tools_file")
    @classmethod
    def _tools_file(cls, value: str) -> str:
        if value and not Path(value).is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file(cls, value: str) -> str:
        if value:
            try:
                text = Path(value).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read {value}: {exc.strerror}") from exc
            del text  # read for the error above; whether any key is left is checked below
        return value

    @model_validator(mode="after")
    def _some_key(self) -> Settings:
        # Keys asked for and none found would turn them off unseen (blanks included: a
        # template that lost its value).
        if (self.api_keys or self.api_keys_file) and not self.keys:
            name = "API_KEYS_FILE" if self.api_keys_file else "API_KEYS"
            raise ValueError(
                f"{name}: holds no key (API_KEYS: comma-separated; API_KEYS_FILE: one a line,"
                " '#' starts a comment); leave both empty to accept requests without keys"
            )
        return self

    @field_validator("cors_allow_origins")
    @classmethod
    def _cors_origins(cls, value: str) -> str:
        for origin in (o.strip() for o in value.split(",")):
            parts = urlsplit(origin)
            # Browsers send an origin as scheme://host[:port], nothing after: any other
            # spelling ("example.com", a trailing slash) would match no request.
            # "null" is what file:// pages and sandboxed frames send.
            if origin not in ("", "*", "null") and (
                not parts.scheme or not parts.netloc or parts.path or parts.query or parts.fragment
            ):
                raise ValueError(
                    f"{origin!r} is not an origin: use scheme://host[:port] with nothing"
                    " after it (https://app.example.com), or * for any (development only)"
                )
        return value

    @property
    def keys(self) -> list[str]:
        """Every accepted API key: API_KEYS plus the lines of API_KEYS_FILE."""
        found = _key_lines(self.api_keys.split(","))
        if self.api_keys_file:
            found += _key_lines(Path(self.api_keys_file).read_text().splitlines())
        return found

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.cors_allow_origins.split(",") if o.strip()]


def _key_lines(lines: list[str]) -> list[str]:
    stripped = (line.strip() for line in lines)
    return [key for key in stripped if key and not key.startswith("#")]


DEFAULT_HOST = "127.0.0.1"  # the containers set HOST=0.0.0.0


class ServerAddress(BaseSettings):
    """Where an HTTP process listens: ``HOST`` and ``PORT`` (the Procfile's convention)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    host: str = DEFAULT_HOST
    port: Annotated[int, Field(ge=1, le=65535)] = 8000


def listen_host() -> str:
    """``HOST`` alone, for listeners without a ``PORT`` of their own (a worker's metrics)."""
    return os.environ.get("HOST") or DEFAULT_HOST


def load_address(default_port: int) -> ServerAddress:
    """``HOST``/``PORT`` from the environment, or exit naming the one that is wrong."""
    try:
        return ServerAddress(port=int(os.environ.get("PORT") or default_port))
    except ValueError:
        sys.exit(
            f"Streamgate cannot start: invalid setting(s)\n  PORT: not a port number "
            f"(got {os.environ.get('PORT')!r}); use 1-65535"
        )


def load_settings() -> Settings:
    """Settings from the environment, or exit naming every variable that is wrong."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            if not error["loc"]:  # a check across settings: its message names them, and
                # its input is every setting, secrets included
                lines.append("  " + error["msg"].removeprefix("Value error, "))
                continue
            name = str(error["loc"][0]).upper()
            lines.append(f"  {name}: {error['msg']} (got {_shown(name, error.get('input'))})")
        sys.exit("Streamgate cannot start: invalid setting(s)\n" + "\n".join(lines))


def _check_redis_url(url: str) -> None:
    """One shard's URL: ValueError saying what is wrong with it."""
    from .redis_conn import sentinel_target  # raises ValueError on a bad Sentinel URL

    options = parse_qs(urlsplit(url).query)
    # Both change what every reply looks like; the relay and the scripts read RESP2 bytes.
    if options.get("protocol", ["2"])[-1] != "2":
        raise ValueError("protocol=3 is not supported (Streamgate speaks RESP2): drop it")
    decode = options.get("decode_responses", [""])[-1]
    if decode and decode.upper() not in ("0", "F", "FALSE", "N", "NO"):
        raise ValueError("decode_responses is not supported (replies stay bytes): drop it")
    if sentinel_target(url) is not None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            "must start with redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://"
        )
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ValueError("has no host name")
        _ = parts.port  # raises ValueError on a port that is not a number
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ValueError(f"database {db!r} is not a number")


_URLS = {"REDIS_URL", "OPENAI_BASE_URL"}


def _shown(name: str, value: object) -> str:
    """A setting's bad value as an error message may show it: never a password."""
    if name == "REDIS_URL" and isinstance(value, str):
        return repr(",".join(without_password(url) for url in split_urls(value)))
    if name in _URLS and isinstance(value, str):
        return repr(without_password(value))
    return repr(value)


def without_password(url: str) -> str:
    """``url`` with its passwords, if any, as ``***``: the one before the host, and those
    given as options (``?password=``, ``?sentinel_password=``)."""
    parts = urlsplit(url)
    try:
        password = parts.password
    except ValueError:
        password = None
    if password:
        userinfo, _, host = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        parts = parts._replace(netloc=f"{user}:***@{host}")
    options = parse_qsl(parts.query, keep_blank_values=True)
    if any(name in _PASSWORD_OPTIONS for name, _ in options):
        masked = [(n, "***" if n in _PASSWORD_OPTIONS else v) for n, v in options]
        parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts)


_PASSWORD_OPTIONS = {"password", "sentinel_password"}
