"""``scripts/run``: a private Redis, the demo LLM, workers and a gateway, until Ctrl-C.

The processes are the Procfile's entries, so a local run is what a process manager or a
container runs. Settings come from the environment, then ``.env``; a bad one stops the run
before anything starts, with the message the services themselves would give.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import sys
from collections import defaultdict, deque
from collections.abc import Awaitable
from pathlib import Path
from typing import NoReturn, TypeVar

from dotenv import dotenv_values

from .errors import LaunchError, ProcessFailed
from .readiness import (
    answers_http,
    check_redis_url,
    free_port,
    port_is_free,
    redis_answers,
    upstream_problem,
)
from .redis_server import PrivateRedis, find_server
from .supervisor import Child, Supervisor

ROOT = Path(__file__).resolve().parents[3]
READY_TIMEOUT_S = 60.0
RESTARTS_MAX = 3  # a process started again this often within the window, and exiting again,
RESTARTS_WINDOW_S = 60.0  # stops the run: it would only keep failing
LOOPBACK = "127.0.0.1"
DEMO_LLM_PORT = 8001  # where the docs say the demo LLM listens; any free port if taken
# Local runs read as text and stop promptly; each is overridden by the environment or .env.
LOCAL_DEFAULTS = {"LOG_FORMAT": "text", "SHUTDOWN_GRACE_S": "5"}

T = TypeVar("T")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM came before the run was up."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"scripts/run: {message} (see scripts/run --help)\n")


def parse_options(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(
        prog="scripts/run",
        description="Run Streamgate on this machine: a private Redis (none when REDIS_URL is "
        "set), the demo LLM (none when OPENAI_BASE_URL is set), workers and a gateway. "
        "Ctrl-C stops them all.",
    )
    parser.add_argument("--port", type=_number(1, 65535), default=8000, help="gateway port (8000)")
    parser.add_argument("--workers", type=_number(1, 64), default=1, help="worker processes (1)")
    return parser.parse_args(argv)


def _number(low: int, high: int) -> type[int]:
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number from {low} to {high}")
        return int(text)

    return parse  # type: ignore[return-value]


def environment() -> dict[str, str]:
    """What every process gets: local defaults, then ``.env``, then the environment."""
    from_file = {k: v for k, v in dotenv_values(ROOT / ".env").items() if v is not None}
    return {**LOCAL_DEFAULTS, **from_file, **os.environ, "PYTHONUNBUFFERED": "1"}


def procfile() -> dict[str, list[str]]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if command.strip() and not line.startswith("#"):
            words = shlex.split(command)
            entries[name.strip()] = [sys.executable if w == "python" else w for w in words]
    return entries


def validate_settings(env: dict[str, str]) -> None:
    """The services' own check of every setting, before anything starts: the shared
    settings, the worker's tools (TOOLS and the tools file, read as the worker reads it;
    its modules are imported by the worker alone) and, without OPENAI_BASE_URL, the demo
    LLM's delay."""
    from demo_llm.settings import delay_problem
    from shared.settings import load_settings
    from worker.tools.loading import check_tools

    os.environ.update(env)
    try:
        settings = load_settings()
    except SystemExit as exc:
        _, *problems = str(exc.code).splitlines()
        raise LaunchError("invalid setting: " + "; ".join(p.strip() for p in problems)) from None
    try:
        check_tools(settings)
    except ValueError as exc:
        raise LaunchError(f"invalid setting: {exc}") from None
    if not env.get("OPENAI_BASE_URL"):
        problem = delay_problem(env.get("DEMO_LLM_DELAY_S") or "")
        if problem:
            raise LaunchError(f"invalid setting: {problem}")


class Run:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.supervisor = Supervisor()
        self.stopping = asyncio.Event()
        self.redis: PrivateRedis | None = None
        self.redis_child: Child | None = None

    async def main(self) -> int:
        env = environment()
        host = env.get("HOST", "127.0.0.1")
        if not port_is_free(host, self.options.port):
            raise LaunchError(
                f"port {self.options.port} is in use: stop what holds it, or pick another "
                "with --port N"
            )
        if env.get("REDIS_URL"):
            await check_redis_url(env["REDIS_URL"])
            validate_settings(env)
        else:
            self.redis = PrivateRedis(find_server(), ROOT / "var" / "redis")
            env["REDIS_URL"] = self.redis.url
            try:
                validate_settings(env)
            except LaunchError:
                self.redis.close()
                raise
        self._on_signals()
        try:
            await self._start(env, host)
            self.supervisor.say("Ctrl-C stops everything.")
            await self._keep_running()
            return 0  # never: the run ends by a signal or a process that keeps exiting
        except Interrupted:
            return 0
        except ProcessFailed as exc:
            self.supervisor.say(f"{exc} (its output is above); stopping everything")
            return 1
        except TimeoutError:
            self.supervisor.say(f"not ready after {READY_TIMEOUT_S:.0f} s; stopping everything")
            return 1
        finally:
            await self._stop(env)

    async def _start(self, env: dict[str, str], host: str) -> None:
        commands = procfile()
        say = self.supervisor.say
        if self.redis is not None:
            say(f"starting {self.redis.binary.name}, data in {self.redis.data_dir}")
            self.redis_child = await self.supervisor.start(
                "redis", self.redis.command(), env, str(ROOT)
            )
            await self._until(redis_answers(self.redis.url), READY_TIMEOUT_S)
        upstream = env.get("OPENAI_BASE_URL")
        if not upstream:
            # The demo LLM serves this run alone: loopback, whatever HOST says.
            port = DEMO_LLM_PORT if port_is_free(LOOPBACK, DEMO_LLM_PORT) else free_port(LOOPBACK)
            llm_env = {**env, "HOST": LOOPBACK, "PORT": str(port)}
            await self.supervisor.start("llm", commands["llm"], llm_env, str(ROOT))
            await self._until(answers_http(f"http://{LOOPBACK}:{port}/v1/models"), READY_TIMEOUT_S)
            env["OPENAI_BASE_URL"] = f"http://{LOOPBACK}:{port}/v1"
        workers = []
        for number in range(1, self.options.workers + 1):
            name = "worker" if self.options.workers == 1 else f"worker.{number}"
            metrics = env.get("METRICS_PORT", "")
            if metrics.isdigit() and metrics != "0":  # the user's: worker N takes it + N - 1
                metrics = str(int(metrics) + number - 1)
            elif metrics != "0":
                metrics = str(free_port(host))
            worker_env = {**env, "METRICS_PORT": metrics}
            workers.append(
                await self.supervisor.start(name, commands["worker"], worker_env, str(ROOT))
            )
        gateway_env = {**env, "PORT": str(self.options.port)}
        await self.supervisor.start("gateway", commands["gateway"], gateway_env, str(ROOT))
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.options.port}"
        waits = [w.wait_for_line(" ready: LLM ") for w in workers]
        await self._until(asyncio.gather(answers_http(url + "/readyz"), *waits), READY_TIMEOUT_S)
        plural = "s" if len(workers) > 1 else ""
        model = env.get("OPENAI_MODEL", "streamgate-demo")
        say(f"Streamgate is up: {url}/ (the web chat)")
        say(f'  curl -N "{url}/chat?prompt=hello"')
        say(f"  model: {model} at {upstream or 'the demo LLM'}; {len(workers)} worker{plural}")
        redis = f"{self.redis.binary.name} at {self.redis.url}" if self.redis else "REDIS_URL"
        say(f"  Redis: {redis}")
        if upstream and (problem := await upstream_problem(upstream, env.get("OPENAI_API_KEY"))):
            say(f"  warning: {problem}: chats will fail until it answers")

    async def _keep_running(self) -> None:
        """Start again any process that exits, as a process manager would: a worker's
        death must look to clients as the contract says (the job ends with an error, or runs
        again), not end every stream of the run. One that keeps exiting stops the run."""
        restarts: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=RESTARTS_MAX))
        loop = asyncio.get_running_loop()
        while True:
            stop = asyncio.ensure_future(self.stopping.wait())
            exited = asyncio.ensure_future(self.supervisor.first_exit())
            try:
                done, _ = await asyncio.wait({stop, exited}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                exited.cancel()
            if stop in done:
                raise Interrupted
            child = exited.result()
            status = f"{child.name} exited with status {child.process.returncode}"
            recent = restarts[child.name]
            if len(recent) == RESTARTS_MAX and loop.time() - recent[0] < RESTARTS_WINDOW_S:
                raise ProcessFailed(
                    f"{status}, its {RESTARTS_MAX + 1}th exit in {RESTARTS_WINDOW_S:.0f} s"
                )
            recent.append(loop.time())
            self.supervisor.say(f"{status}; starting it again")
            again = await self.supervisor.restart(child)
            if child is self.redis_child:
                self.redis_child = again

    async def _until(self, awaitable: Awaitable[T], ready_within: float | None = None) -> T:
        """``awaitable``'s result, unless a stop is asked for or a process exits first."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.stopping.wait())
        exited = asyncio.ensure_future(self.supervisor.first_exit())
        try:
            done, _ = await asyncio.wait(
                {task, stop, exited}, timeout=ready_within, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for each in (task, stop, exited):
                each.cancel()
        if task in done:
            return task.result()
        if stop in done:
            raise Interrupted
        if exited in done:
            child = exited.result()
            when = " before it was ready" if ready_within else ""
            raise ProcessFailed(f"{child.name} exited with status {child.process.returncode}{when}")
        raise TimeoutError

    def _on_signals(self) -> None:
        loop = asyncio.get_running_loop()

        def stop() -> None:
            if self.stopping.is_set():
                self.supervisor.say("stopping now")
                self.supervisor.kill_all()
            else:
                self.supervisor.say("stopping (Ctrl-C again to kill everything at once)")
                self.stopping.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)

    async def _stop(self, env: dict[str, str]) -> None:
        grace = float(env.get("SHUTDOWN_GRACE_S", "5")) + 5
        others = [c for c in self.supervisor.children if c is not self.redis_child]
        await self.supervisor.stop(others, grace)
        if self.redis_child is not None:
            await self.supervisor.stop([self.redis_child], 30)
        if self.redis is not None:
            self.redis.close()
        self.supervisor.say("stopped")


def main() -> None:
    options = parse_options(sys.argv[1:])
    try:
        code = asyncio.run(Run(options).main())
    except LaunchError as exc:
        print(f"scripts/run: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # Ctrl-C before anything started: nothing to stop
        code = 130
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    sys.exit(code)
