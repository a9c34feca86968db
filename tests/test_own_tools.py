"""A team's own tools in a running stack: Python modules and real MCP servers (the ``mcp``
SDK's, over streamable HTTP and stdio), per-role tool sets, ``GET /tools``, and what holds
when a server dies or a job is cancelled mid-call."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from . import sse
from .harness import Stack, free_port, private_db, wait_for_port, wait_until

FIXTURES = Path(__file__).with_name("fixtures")
PROBE = FIXTURES / "mcp_probe_server.py"
OUTPUT_CAP = 1000
SUPPORT_TOOLS = [
    "lookup_ticket",
    "probe_echo",
    "probe_pid",
    "probe_slow",
    "probe_fail",
    "probe_grow",
]

ROLES = """
default = "assistant"
[roles.assistant]
system_prompt = "Help."
[roles.support]
system_prompt = "Support agent."
tools = ["probe_*", "lookup_ticket"]
[roles.pirate]
system_prompt = "Arr."
tools = []
"""


class ProbeServer:
    """The probe MCP server over streamable HTTP, on a port that survives a restart."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> ProbeServer:
        env = {**os.environ, "PROBE_LOG": str(self.log)}
        self.proc = subprocess.Popen(
            [sys.executable, str(PROBE), str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def notes(self) -> list[tuple[float, str]]:
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        return [(float(line.split(" ", 2)[0]), line.split(" ", 2)[2]) for line in lines]


def tools_file(folder: Path, probe: ProbeServer) -> Path:
    shutil.copy(FIXTURES / "team_tools.py", folder / "team_tools.py")
    path = folder / "tools.toml"
    path.write_text(
        f"""
[python]
modules = ["team_tools"]

[mcp.probe]
url = "{probe.url}"
headers = {{ Authorization = "Bearer ${{PROBE_TOKEN}}" }}

[mcp.files]
command = "{sys.executable}"
args = ["{PROBE}", "stdio"]
env = {{ PROBE_LOG = "{probe.log}.stdio" }}
prefix = "local"
"""
    )
    return path


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProbeServer]:
    server = ProbeServer(tmp_path_factory.mktemp("probe") / "probe.log").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def tools_stack(
    redis_url: str, logdir: Path, probe: ProbeServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("tools")
    (folder / "roles.toml").write_text(ROLES)
    env = {
        "TOOLS_FILE": str(tools_file(folder, probe)),
        "ROLES_FILE": str(folder / "roles.toml"),
        "TOOL_OUTPUT_MAX_CHARS": str(OUTPUT_CAP),
        "TOOL_TIMEOUT_S": "20",
        "PROBE_TOKEN": "s3cret",
    }
    stack = Stack(private_db(redis_url), logdir, env).start()
    yield stack
    stack.stop()


def chat(stack: Stack, prompt: str, **params: str) -> sse.Stream:
    with httpx.Client(timeout=60) as client:
        return sse.read(client, stack.gateway.url + "/chat", params={"prompt": prompt, **params})


def call(name: str, arguments: dict[str, Any] | None = None) -> str:
    return f"[call {name} {json.dumps(arguments or {})}]"


def the_call(stream: sse.Stream) -> dict[str, Any]:
    assert sse.ends_done(stream), stream.events
    [started] = [e["tool_call"] for e in stream.events if "tool_call" in e]
    [[result]] = [e["tools_called"] for e in stream.events if "tools_called" in e]
    assert started == {"id": result["id"], "name": result["name"]}
    found: dict[str, Any] = result
    return found


def listed(stack: Stack, **params: str) -> list[dict[str, Any]]:
    response = httpx.get(stack.gateway.url + "/tools", params=params, timeout=10)
    assert response.status_code == 200, response.text
    tools: list[dict[str, Any]] = response.json()
    return tools


def test_get_tools_lists_every_source(tools_stack: Stack) -> None:
    tools = {t["name"]: t for t in listed(tools_stack)}
    sources = {name: t["source"] for name, t in tools.items()}
    assert sources == {
        "calculator": "builtin",
        "current_time": "builtin",
        "shout": "python",
        "lookup_ticket": "python",
        "explode": "python",
        "refuse": "python",
        "flood": "python",
        "probe_echo": "mcp:probe",
        "probe_pid": "mcp:probe",
        "probe_slow": "mcp:probe",
        "probe_fail": "mcp:probe",
        "probe_grow": "mcp:probe",
        "local_echo": "mcp:files",
        "local_pid": "mcp:files",
        "local_slow": "mcp:files",
        "local_fail": "mcp:files",
        "local_grow": "mcp:files",
    }
    assert tools["shout"]["description"] == "Say a text in capitals."
    shout = tools["shout"]["parameters"]
    assert shout["properties"]["text"] == {"type": "string", "description": "What to say."}
    assert shout["required"] == ["text"]
    assert tools["probe_echo"]["description"] == "Repeat a text."
    assert tools["probe_echo"]["parameters"]["required"] == ["text"]


def test_per_role_tools_in_the_listing_and_upstream(tools_stack: Stack) -> None:
    assert [t["name"] for t in listed(tools_stack, role="pirate")] == []
    assert [t["name"] for t in listed(tools_stack, role="support")] == SUPPORT_TOOLS
    # What the upstream was offered, as the demo model reads it back.
    assert chat(tools_stack, "[tools]", role="pirate").text == "Tools offered: none."
    offered = chat(tools_stack, "[tools]", role="support").text
    assert offered.removeprefix("Tools offered: ").rstrip(".").split(", ") == SUPPORT_TOOLS
    # A tool the role does not offer cannot be called, whatever the model asks.
    result = the_call(chat(tools_stack, call("shout", {"text": "hi"}), role="support"))
    assert result["output"].startswith("error: there is no tool named 'shout'")
    response = httpx.get(tools_stack.gateway.url + "/tools", params={"role": "nobody"})
    assert response.status_code == 400 and "unknown role" in response.json()["error"]


@pytest.mark.parametrize("name", ["probe_echo", "local_echo"])
def test_an_mcp_tool_gets_its_arguments_exactly(tools_stack: Stack, name: str) -> None:
    arguments: dict[str, Any] = {"text": 'héllo "data:" \n😀', "times": 2}
    stream = chat(tools_stack, call(name, arguments))
    result = the_call(stream)
    assert result["name"] == name
    assert result["arguments"] == arguments
    assert result["output"] == arguments["text"] * 2
    assert f"{name} said" in stream.text


def test_an_mcp_tool_error_is_an_output_for_the_model(tools_stack: Stack) -> None:
    result = the_call(chat(tools_stack, call("probe_fail", {"reason": "no paper"})))
    assert result["output"].startswith("error: ") and "no paper" in result["output"]
    result = the_call(chat(tools_stack, call("probe_echo", {"times": 2})))  # no text
    assert result["output"].startswith("error: ")


def test_python_tools_sync_async_and_failing(tools_stack: Stack) -> None:
    assert the_call(chat(tools_stack, call("shout", {"text": "hi", "times": 2})))["output"] == (
        "HI HI"
    )
    result = the_call(chat(tools_stack, call("lookup_ticket", {"ticket": 42})))
    assert result["output"] == "ticket 42: printer on fire, status open"
    result = the_call(chat(tools_stack, call("explode")))
    assert result["output"] == "error: explode failed unexpectedly (RuntimeError)"
    result = the_call(chat(tools_stack, call("refuse", {"reason": "nope"})))
    assert result["output"] == "error: refused: nope"
    result = the_call(chat(tools_stack, call("lookup_ticket", {"ticket": "forty"})))
    assert result["output"].startswith("error: invalid arguments for lookup_ticket: ticket:")


def test_a_huge_output_is_capped_and_says_so(tools_stack: Stack) -> None:
    stream = chat(tools_stack, call("flood", {"megabytes": 10}))
    output = the_call(stream)["output"]
    assert output.startswith("x" * OUTPUT_CAP + "\n[output cut: the tool returned 10,485,760")
    assert len(output) < OUTPUT_CAP + 200
    assert len(stream.raw) < 20_000  # the stream, and the model, got the cut output only


def test_cancelling_a_job_cancels_its_mcp_call_within_a_second(
    tools_stack: Stack, probe: ProbeServer, client: httpx.Client
) -> None:
    url = tools_stack.gateway.url
    job = client.post(url + "/chat", json={"prompt": call("probe_slow", {"seconds": 60})})
    job_id = job.json()["job_id"]
    wait_until(lambda: "slow started" in [n for _, n in probe.notes()], 15, "the slow call")
    cancelled_at = time.time()
    assert client.delete(f"{url}/chat/{job_id}").status_code == 204
    wait_until(lambda: "slow cancelled" in [n for _, n in probe.notes()], 5, "the cancel")
    [seen_at] = [at for at, note in probe.notes() if note == "slow cancelled"]
    assert seen_at - cancelled_at < 1.0
    stream = sse.read(client, f"{url}/chat/{job_id}/events")
    assert stream.finals == [{"error": "cancelled"}]


def test_a_changed_tool_list_reaches_get_tools(tools_stack: Stack) -> None:
    assert the_call(chat(tools_stack, call("probe_grow")))["output"] == "grown"
    wait_until(
        lambda: "probe_added" in [t["name"] for t in listed(tools_stack)], 10, "the new tool"
    )
    assert the_call(chat(tools_stack, call("probe_added")))["output"] == "added here"


@pytest.mark.slow
def test_an_mcp_server_killed_and_back(
    redis_url: str, logdir: Path, tmp_path: Path, make_stack: Callable[..., Stack]
) -> None:
    probe = ProbeServer(tmp_path / "probe.log").start()
    try:
        stack = make_stack(TOOLS_FILE=str(tools_file(tmp_path, probe)), PROBE_TOKEN="t")
        assert the_call(chat(stack, call("probe_echo", {"text": "a"})))["output"] == "a"
        probe.kill()
        result = the_call(chat(stack, call("probe_echo", {"text": "b"})))  # ends with done
        assert result["output"].startswith("error: the MCP server 'probe'")
        probe.start()
        result = the_call(chat(stack, call("probe_echo", {"text": "c"})))
        assert result["output"] == "c"
        # A stdio server that dies is started again.
        before = the_call(chat(stack, call("local_pid")))["output"]
        psutil.Process(int(before)).kill()
        outputs = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            outputs.append(the_call(chat(stack, call("local_pid")))["output"])
            if outputs[-1].isdigit():
                break
        assert outputs[-1].isdigit() and outputs[-1] != before, outputs
        assert all(o.startswith("error: ") for o in outputs[:-1]), outputs
    finally:
        probe.kill()


@pytest.mark.slow
def test_a_stopping_worker_stops_its_stdio_servers_promptly(
    tmp_path: Path, make_stack: Callable[..., Stack]
) -> None:
    path = tmp_path / "tools.toml"
    path.write_text(
        f"""
[mcp.files]
command = "{sys.executable}"
args = ["{PROBE}", "stdio"]

[mcp.mute]                  # a server that never answers
command = "sleep"
args = ["1000"]
"""
    )
    stack = make_stack(TOOLS_FILE=str(path), SHUTDOWN_GRACE_S="1")
    [worker] = stack.workers
    assert worker.proc is not None
    # The mute one is between attempts now and then (each ends after the connect timeout).
    proc = psutil.Process(worker.proc.pid)
    wait_until(lambda: len(proc.children(recursive=True)) == 2, 20, "both servers running")
    servers = proc.children(recursive=True)
    assert the_call(chat(stack, call("files_echo", {"text": "x"})))["output"] == "x"
    stopped_at = time.monotonic()
    assert worker.stop(timeout=20) == 0
    assert time.monotonic() - stopped_at < 10
    psutil.wait_procs(servers, timeout=5)
    assert not [s for s in servers if s.is_running() and s.status() != psutil.STATUS_ZOMBIE]
    assert "MCP server mute" in worker.log()  # the silent one was named in the log


def test_the_contracts_stdio_example_runs_a_python_module_with_the_workers_python(
    tmp_path: Path, make_stack: Callable[..., Stack]
) -> None:
    """``command = "python"``, ``args = ["-m", ...]`` as PROTOCOL.md writes it: the worker's
    own interpreter (with the MCP SDK) runs it, even where PATH has no such python, and
    the module is found through the worker's PYTHONPATH, or beside the tools file (a server
    without ``cwd`` runs in the file's folder)."""
    path = tmp_path / "tools.toml"
    path.write_text(
        '[mcp.files]\ncommand = "python"\nargs = ["-m", "mcp_probe_server", "stdio"]\n'
        '[mcp.beside]\ncommand = "python"\nargs = ["-m", "beside_server", "stdio"]\n'
    )
    shutil.copy(FIXTURES / "mcp_probe_server.py", tmp_path / "beside_server.py")
    python_path = os.pathsep.join(p for p in (str(FIXTURES), os.environ.get("PYTHONPATH")) if p)
    stack = make_stack(TOOLS_FILE=str(path), PYTHONPATH=python_path, PATH="/usr/bin:/bin")
    assert the_call(chat(stack, call("files_echo", {"text": "x"})))["output"] == "x"
    assert the_call(chat(stack, call("beside_echo", {"text": "y"})))["output"] == "y"
