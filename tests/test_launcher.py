"""scripts/run, started as a user would from a clean copy of the repository."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from launcher.errors import LaunchError
from launcher.readiness import port_is_free, upstream_problem
from shared.events import WORKER_LOST

from . import sse
from .harness import ROOT, Service, free_port, private_db, release_db

UP = "Streamgate is up: "
SERVER_NAMES = ("valkey-server", "redis-server")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's files as a fresh clone would have them (and those not committed
    yet), without its virtual environment or its local Redis data."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    copy = tmp_path_factory.mktemp("clone")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    return copy


def user_env(**extra: str) -> dict[str, str]:
    """A shell's environment without the settings a test run may carry."""
    drop = ("REDIS_URL", "OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MODEL", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "NO_COLOR": "1", **extra}


class Launch:
    """``scripts/run`` as a child process, its output collected as it comes."""

    def __init__(self, checkout: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(checkout / "scripts" / "run"), "--port", str(self.port), *args],
            cwd=checkout,
            env=env or user_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for raw in self.proc.stdout:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_up(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(UP in line for line in self.lines):
            assert self.proc.poll() is None, f"scripts/run exited:\n{self.output}"
            assert time.monotonic() < deadline, f"not up after {timeout} s:\n{self.output}"
            time.sleep(0.1)

    def found(self, pattern: str) -> re.Match[str]:
        match = re.search(pattern, self.output)
        assert match, f"{pattern!r} not in the output:\n{self.output}"
        return match

    def interrupt(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        self.reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
            self.proc.kill()
            self.proc.wait()
        self.reader.join(5)


@pytest.fixture
def launches() -> Iterator[list[Launch]]:
    started: list[Launch] = []
    yield started
    for launch in started:
        launch.kill()


def chat(url: str, prompt: str, session: str) -> sse.Stream:
    with httpx.Client(timeout=60) as client:
        return sse.read(client, url + "/chat", params={"prompt": prompt, "session": session})


def port_in_use(port: int) -> bool:
    """Anything listening on ``port`` (closed connections may linger in TIME_WAIT)."""
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr.port == port
        for c in psutil.net_connections("inet")
    )


def test_one_command_runs_everything_and_ctrl_c_stops_it_all(
    checkout: Path, launches: list[Launch]
) -> None:
    run = Launch(checkout)
    launches.append(run)
    run.wait_up()
    launcher = psutil.Process(run.proc.pid)
    family = launcher.children(recursive=True)
    servers = [p for p in family if p.name() in SERVER_NAMES]
    assert len(servers) == 1 and servers[0].ppid() == launcher.pid, "Redis is its own child"
    assert not [c for c in servers[0].net_connections("inet") if c.status == "LISTEN"], (
        "its Redis takes no port"
    )
    assert (checkout / "var" / "redis").is_dir(), "its data lives in the checkout"
    llm_port = int(run.found(r"ready: LLM http://127\.0\.0\.1:(\d+)/v1").group(1))

    stream = chat(run.url, "remember the word marmalade", "launcher")
    assert stream.status == 200 and sse.ends_done(stream), stream.raw

    assert run.interrupt() == 0, run.output
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not port_in_use(run.port) and not port_in_use(llm_port)
    assert run.lines[-1].endswith("stopped")

    again = Launch(checkout)
    launches.append(again)
    again.wait_up()
    echoed = chat(again.url, "[echo] what word did I say?", "launcher")
    assert "marmalade" in echoed.text, "the session outlived the first run"
    assert again.interrupt() == 0


def test_with_redis_url_and_a_model_in_dotenv_it_starts_neither(
    checkout: Path, launches: list[Launch], redis_url: str, logdir: Path
) -> None:
    db = private_db(redis_url)
    model = Service("llm", {}, logdir, free_port()).start()
    dotenv = checkout / ".env"
    dotenv.write_text(f"OPENAI_BASE_URL={model.url}/v1\nOPENAI_MODEL=from-dotenv\n")
    try:
        run = Launch(checkout, "--workers", "2", env=user_env(REDIS_URL=db))
        launches.append(run)
        run.wait_up()
        family = psutil.Process(run.proc.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in family]
        assert not [c for c in commands if "demo_llm" in c or "-server" in c], commands
        assert run.output.count(f" ready: LLM {model.url}/v1, model from-dotenv,") == 2
        stream = chat(run.url, "hello", "elsewhere")
        assert sse.ends_done(stream)
        assert httpx.get(model.url + "/demo/stats").json()["requests"] == 1
        job_id = stream.events[0]["job_id"]
        client = redis.Redis.from_url(db)
        assert client.exists(f"sg:{{{job_id}}}:events"), "the job lives in REDIS_URL's Redis"
        client.close()
        assert run.interrupt() == 0
    finally:
        dotenv.unlink()
        model.stop()
        release_db(db)


@pytest.mark.asyncio
async def test_a_model_that_does_not_answer_is_named() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    problem = await upstream_problem(url, "sk-key")
    assert problem is not None and problem.startswith(f"OPENAI_BASE_URL {url} does not answer")


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, r"REDIS_URL redis://127\.0\.0\.1:1/0 does not"),
        ({"REDIS_URL": "redis://:secret@127.0.0.1:1/0"}, r"REDIS_URL redis://:\*\*\*@127"),
        ({"REDIS_URL": "http://nope"}, r"REDIS_URL"),
        ({"MAX_PROMPT_CHARS": "lots"}, r"MAX_PROMPT_CHARS"),
        ({"TOOLS": "nosuchtool"}, r"TOOLS: unknown tool 'nosuchtool'"),
        ({"TOOLS_FILE": "/etc/passwd"}, r"TOOLS_FILE: cannot read tools file /etc/passwd"),
        ({"DEMO_LLM_DELAY_S": "abc"}, r"DEMO_LLM_DELAY_S: got 'abc'"),
    ],
)
def test_a_bad_setting_is_one_clear_line_and_status_2(
    checkout: Path, setting: dict[str, str], said: str
) -> None:
    done = subprocess.run(
        [str(checkout / "scripts" / "run")], cwd=checkout, env=user_env(**setting),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert re.search(said, done.stderr), done.stderr
    assert said_once(done.stderr), done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "secret" not in done.stdout + done.stderr


def test_a_port_in_use_is_named(checkout: Path) -> None:
    with socket_listening() as port:
        done = subprocess.run(
            [str(checkout / "scripts" / "run"), "--port", str(port)], cwd=checkout,
            env=user_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2
    assert f"port {port} is in use" in done.stderr
    assert said_once(done.stderr), done.stderr


@pytest.mark.parametrize("host", ["999.1.1.1", "example.invalid", "192.0.2.1"])
def test_a_host_it_cannot_listen_on_is_named_not_taken_for_a_busy_port(host: str) -> None:
    with pytest.raises(LaunchError, match=f"cannot listen on HOST={host} port 8000: .+; set HOST"):
        port_is_free(host, 8000)


def test_bad_options_are_one_line_and_status_2(checkout: Path) -> None:
    for args in (["--workers", "0"], ["--port", "http"], ["--frobnicate"]):
        done = subprocess.run(
            [str(checkout / "scripts" / "run"), *args], cwd=checkout, env=user_env(),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, args
        assert said_once(done.stderr), done.stderr
        assert "Traceback" not in done.stderr


def said_once(stderr: str) -> bool:
    """The error is one line, the last (after what installing printed)."""
    lines = stderr.strip().splitlines()
    return [line for line in lines if line.startswith("scripts/run")] == lines[-1:]


@contextlib.contextmanager
def socket_listening() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_workers_that_die_are_started_again_and_their_job_ends_as_the_contract_says(
    checkout: Path, launches: list[Launch]
) -> None:
    """kill -9 of a worker stopped the whole run, ending every open stream without a final
    event. Now the run starts it again, as a process manager would: the job it ran ends with
    the worker-lost error, and chats go on."""
    run = Launch(checkout, "--workers", "2", env=user_env(WORKER_LOST_TIMEOUT_S="4"))
    launches.append(run)
    run.wait_up()
    pids = {int(pid) for pid in re.findall(r"worker \S+:(\d+) ready: LLM", run.output)}
    assert len(pids) == 2, run.output
    with httpx.Client(timeout=60) as client:
        posted = client.post(run.url + "/chat", json={"prompt": "[long 400] [delay 0.05]"})
        events = f"{run.url}/chat/{posted.json()['job_id']}/events"
        with client.stream("GET", events) as started:  # until its first token
            next(line for line in started.iter_lines() if '"token"' in line)
        for pid in pids:  # whichever runs it
            os.kill(pid, signal.SIGKILL)
        stream = sse.read(client, events)
        assert stream.finals == [{"error": WORKER_LOST}], stream.events
        for name in ("worker.1", "worker.2"):
            assert f"{name} exited with status -9; starting it again" in run.output
        deadline = time.monotonic() + 60
        while len(re.findall(r"worker \S+:\d+ ready: LLM", run.output)) < 4:
            assert time.monotonic() < deadline and run.proc.poll() is None, run.output
            time.sleep(0.1)
        after = sse.read(client, run.url + "/chat", params={"prompt": "[long 5]"})
        assert sse.ends_done(after), after.events
    assert run.interrupt() == 0
