"""Real processes for the tests: a throwaway Redis, and the Procfile's services on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent

# Short timeouts so that fault tests finish in seconds; each test may override.
FAST_ENV = {
    "PING_INTERVAL_S": "1",
    "WORKER_LOST_TIMEOUT_S": "3",
    "UPSTREAM_IDLE_TIMEOUT_S": "2",
    "QUEUE_TIMEOUT_S": "5",
    "DISCONNECT_GRACE_S": "2",
    "OPENAI_MAX_RETRIES": "0",
    "SHUTDOWN_GRACE_S": "2",
    "DEMO_LLM_DELAY_S": "0.002",
    "LOG_LEVEL": "INFO",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def redis_server_binary() -> str:
    """The server the tests start: STREAMGATE_TEST_REDIS_SERVER, else redis-server from PATH,
    else what scripts/run would start (the embedded Valkey)."""
    chosen = os.environ.get("STREAMGATE_TEST_REDIS_SERVER") or shutil.which("redis-server")
    if chosen:
        return chosen
    from launcher.redis_server import find_server

    return find_server().path


def procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


class RedisServer:
    """A Redis of our own on a free port, which fault tests may stop and start."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class Service:
    """One Procfile entry running as a real process, its output kept in a log file."""

    def __init__(self, name: str, env: dict[str, str], logdir: Path, port: int | None = None):
        self.name = name
        self.port = port
        self.env = env
        self.log_path = logdir / f"{name}-{port or os.getpid()}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> Service:
        env = {**os.environ, **self.env}
        if self.port is not None:
            env["PORT"] = str(self.port)
        command = shlex.split(procfile()[self.name])
        if command[0] == "python":
            command[0] = sys.executable
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        if wait and self.port is not None:
            wait_for_port(self.port, proc=self.proc)
        return self

    def wait_ready(self, text: str, timeout: float = 60.0) -> None:
        """Wait until the log shows ``text`` (for processes without a port)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not log {text!r}: {self.log()[-2000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


_free_dbs = list(range(1, 16))  # database 0 is left to whoever else uses this Redis


def private_db(redis_url: str) -> str:
    """The same Redis, a database no running stack uses (emptied): stacks must not take
    each other's jobs. ``release_db`` gives it back."""
    assert _free_dbs, "more than 15 stacks at once: stop one first"
    base = redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url
    url = f"{base}/{_free_dbs.pop(0)}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


def release_db(url: str) -> None:
    """Give back a database ``private_db`` gave (other URLs: nothing to give back)."""
    tail = url.rsplit("/", 1)[1]
    db = int(tail) if tail.isdigit() else 0
    if 0 < db < 16 and db not in _free_dbs:
        _free_dbs.append(db)


class Stack:
    """Demo LLM, workers and gateways against one Redis: the Procfile's topology."""

    def __init__(self, redis_url: str, logdir: Path, env: dict[str, str] | None = None):
        self.logdir = logdir
        self.redis_url = redis_url
        self.llm = Service("llm", {**FAST_ENV, **(env or {})}, logdir, free_port())
        self.env = {
            **FAST_ENV,
            "REDIS_URL": redis_url,
            "OPENAI_BASE_URL": f"http://127.0.0.1:{self.llm.port}/v1",
            **(env or {}),
        }
        self.gateways: list[Service] = []
        self.workers: list[Service] = []

    @property
    def gateway(self) -> Service:
        return self.gateways[0]

    def start(self, gateways: int = 1, workers: int = 1) -> Stack:
        self.llm.start()
        for _ in range(workers):
            self.add_worker()
        for _ in range(gateways):
            self.add_gateway()
        return self

    def add_worker(self, **env: str) -> Service:
        env = {"METRICS_PORT": str(free_port()), **env}
        worker = Service("worker", {**self.env, **env}, self.logdir).start(wait=False)
        worker.wait_ready("ready: LLM")
        self.workers.append(worker)
        return worker

    def add_gateway(self, **env: str) -> Service:
        gateway = Service("gateway", {**self.env, **env}, self.logdir, free_port()).start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(gateway.url + "/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.05)
        self.gateways.append(gateway)
        return gateway

    def stop(self) -> None:
        for service in [*self.gateways, *self.workers, self.llm]:
            service.stop()
        release_db(self.redis_url)

    def llm_stats(self) -> dict[str, int]:
        stats: dict[str, int] = httpx.get(self.llm.url + "/demo/stats", timeout=5).json()
        return stats


def cancel_closes_the_upstream_within_a_second(
    client: httpx.Client, stack: Stack, job_id: str
) -> None:
    """``DELETE`` the job once its request is at the demo LLM: the LLM sees that request
    closed within the contract's second."""
    closed_before = stack.llm_stats()["closed_early"]
    # The request is at the model (a cancel before it is sent closes nothing there).
    wait_until(lambda: stack.llm_stats()["open_streams"] == 1, 5, "the request at the LLM")
    cancelled_at = time.monotonic()
    assert client.delete(f"{stack.gateway.url}/chat/{job_id}").status_code == 204
    while stack.llm_stats()["closed_early"] == closed_before:
        assert time.monotonic() - cancelled_at < 1.0, "the upstream request is still open"
        time.sleep(0.02)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


async def wait_until_async(
    condition: Callable[[], bool | Awaitable[bool]], within_s: float, what: str
) -> None:
    """``wait_until`` inside an event loop: it polls without blocking the loop, and
    ``condition`` may be a coroutine function (a Redis query)."""
    deadline = time.monotonic() + within_s
    while True:
        met = condition()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
