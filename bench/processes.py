"""The processes under test, each started by the bench itself on free ports.

Every service runs as ``python -m <module>`` straight from this interpreter (no shell, no
honcho), so the pid we hold is the process whose CPU and memory we read in /proc.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_file_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit (children inherit it); returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the bench dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Process:
    """One child process with its output in a log file, so a failure can show its tail."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def start(self) -> Process:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                preexec_fn=die_with_parent,
            )
        return self

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _python(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def _wait(
    check: Callable[[], bool], what: str, procs: list[Process], timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            proc.check_alive()
        with contextlib.suppress(OSError, httpx.HTTPError):
            if check():
                return
        time.sleep(0.05)
    tails = "\n".join(f"--- {p.name} ({p.log_path}):\n{p.log_tail(1500)}" for p in procs)
    raise TimeoutError(f"{what} not ready after {timeout} s\n{tails}")


def _logged(proc: Process, text: str) -> Callable[[], bool]:
    return lambda: text in proc.log_tail(100_000)


def _http_ok(url: str) -> bool:
    return httpx.get(url, timeout=1.0).status_code == 200


@dataclass
class Cluster:
    """Redis (one server per shard), the demo LLM, the direct relay, one gateway and its
    workers."""

    logdir: Path
    llm_delay_s: float
    workers: int = 1
    worker_max_jobs: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    shards: int = 1
    redis_ports: list[int] = field(default_factory=list)
    llm_port: int = field(default_factory=free_port)
    relay_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    redis_procs: list[Process] = field(default_factory=list)
    llm: Process | None = None
    relay: Process | None = None
    gateway: Process | None = None
    worker_procs: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.redis_ports = self.redis_ports or [free_port() for _ in range(self.shards)]

    @property
    def redis_urls(self) -> list[str]:
        """One URL per shard, in the order of ``REDIS_URL``: a job id's first two hex digits
        name its place."""
        return [f"redis://127.0.0.1:{port}/0" for port in self.redis_ports]

    @property
    def redis_url(self) -> str:
        return ",".join(self.redis_urls)

    @property
    def redis_port(self) -> int:
        """The first shard's port (the only one, unless ``shards`` > 1)."""
        return self.redis_ports[0]

    @property
    def redis(self) -> Process | None:
        """The first shard's server."""
        return self.redis_procs[0] if self.redis_procs else None

    @property
    def llm_url(self) -> str:
        return f"http://127.0.0.1:{self.llm_port}"

    @property
    def all(self) -> list[Process]:
        found = [*self.redis_procs, self.llm, self.relay, self.gateway, *self.worker_procs]
        return [p for p in found if p is not None]

    def service_env(self) -> dict[str, str]:
        """Settings shared by gateway and workers: defaults, except what a bench must change."""
        env = {
            "REDIS_URL": self.redis_url,
            "OPENAI_BASE_URL": f"{self.llm_url}/v1",
            "OPENAI_MAX_RETRIES": "0",
            "LOG_LEVEL": "INFO",
            # Every client of a bench is one address: the per-address cap would refuse most.
            "MAX_STREAMS_PER_KEY": "0",
        }
        if self.worker_max_jobs is not None:
            env["WORKER_MAX_JOBS"] = str(self.worker_max_jobs)
        return {**env, **self.extra_env}

    def start(self) -> Cluster:
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.redis_procs = [
            self._redis_server("redis" if self.shards == 1 else f"redis{i}", port).start()
            for i, port in enumerate(self.redis_ports)
        ]
        llm_env = {"PORT": str(self.llm_port), "DEMO_LLM_DELAY_S": f"{self.llm_delay_s:f}"}
        self.llm = Process("demo_llm", _python("demo_llm"), llm_env, self.logdir).start()
        relay_env = {"PORT": str(self.relay_port), "OPENAI_BASE_URL": f"{self.llm_url}/v1"}
        self.relay = Process("direct_relay", _python("bench.direct_relay"), relay_env, self.logdir)
        self.relay.start()
        for proc, port in zip(self.redis_procs, self.redis_ports, strict=True):
            _wait(partial(_port_open, port), proc.name, [proc])
        env = self.service_env()
        self.gateway = Process(
            "gateway", _python("gateway"), {**env, "PORT": str(self.gateway_port)}, self.logdir
        ).start()
        self.worker_procs = [
            # Each worker serves its metrics on a port of its own (the default is shared).
            Process(
                f"worker{i}",
                _python("worker"),
                {**env, "METRICS_PORT": str(free_port())},
                self.logdir,
            ).start()
            for i in range(self.workers)
        ]
        _wait(lambda: _http_ok(f"{self.llm_url}/v1/models"), "demo LLM", [self.llm])
        relay_url = f"http://127.0.0.1:{self.relay_port}/healthz"
        _wait(lambda: _http_ok(relay_url), "direct relay", [self.relay])
        gateway_url = f"http://127.0.0.1:{self.gateway_port}/readyz"
        _wait(lambda: _http_ok(gateway_url), "gateway", [self.gateway])
        for worker in self.worker_procs:
            _wait(_logged(worker, "ready: LLM"), worker.name, [worker])
        return self

    def _redis_server(self, name: str, port: int) -> Process:
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--maxclients", "60000"]
        argv += ["--dir", str(self.logdir)]
        return Process(name, argv, {}, self.logdir)

    def check_alive(self) -> None:
        for proc in self.all:
            proc.check_alive()

    def stop(self) -> None:
        for proc in reversed(self.all):
            proc.stop()

    def llm_open_streams(self) -> int:
        stats = httpx.get(f"{self.llm_url}/demo/stats", timeout=5).json()
        return int(stats["open_streams"])


def _port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), 0.2):
        return True


def workers_for(streams: int, per_worker: int = 900) -> int:
    """Workers needed so no worker holds more upstream streams than the SDK's pool allows."""
    return max(1, math.ceil(streams / per_worker))
