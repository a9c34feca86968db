"""The tools file, tool names, and what an agent may yield: checked without a stack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared import events as ev
from worker.chat_job import relay_agent
from worker.metrics import WorkerMetrics
from worker.tools import FunctionTool
from worker.tools.naming import VALID_NAME, public_name
from worker.tools.tools_file import load_tools_file

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tools.toml"


def load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "tools.toml"
    path.write_text(text)
    return load_tools_file(path)


def test_the_documented_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEARCH_API_KEY", "k")
    config = load_tools_file(EXAMPLE)
    assert [server.name for server in config.mcp] == ["search", "files"]
    assert config.mcp[0].headers == {"Authorization": "Bearer k"}


def test_a_full_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN", "t0k")
    (tmp_path / "srv").mkdir()
    config = load(
        tmp_path,
        """
builtins = ["calculator"]
[python]
modules = ["a.b"]
[mcp.web]
url = "https://example.com/mcp"
headers = { X-Key = "${TOKEN}" }
timeout_s = 3
tools = ["search_*"]
[mcp.files]
command = "node"
args = ["server.js", "--token=${TOKEN}"]
env = { ROOT = "/data" }
cwd = "srv"
prefix = ""
""",
    )
    assert config.builtins == ["calculator"] and config.modules == ["a.b"]
    web, files = config.mcp
    assert (web.url, web.headers, web.timeout_s, web.tools) == (
        "https://example.com/mcp",
        {"X-Key": "t0k"},
        3.0,
        ["search_*"],
    )
    assert (web.prefix, web.transport) == ("web", "streamable HTTP")
    assert (files.command, files.args, files.env) == (
        "node",
        ["server.js", "--token=t0k"],
        {"ROOT": "/data"},
    )
    assert (files.cwd, files.prefix, files.transport) == (str(tmp_path / "srv"), "", "stdio")


def test_a_stdio_server_without_cwd_runs_in_the_files_folder(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "tools.toml").write_text('[mcp.x]\ncommand = "python"\n')
    [server] = load_tools_file(tmp_path / "conf" / "tools.toml").mcp
    assert server.cwd == str(tmp_path / "conf")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[mcp.x]\nurl = 'http://h/mcp'\ncommand = 'a'", "either url (streamable HTTP) or command"),
        ("[mcp.x]\nprefix = 'p'", "either url"),
        ("[mcp.x]\nurl = 'ftp://h/mcp'", "http:// or https://"),
        (
            "[mcp.x]\nurl = 'http://h/mcp'\nheaders = { A = '${NOT_SET_ANYWHERE}' }",
            "no NOT_SET_ANYWHERE",
        ),
        ("[mcp.x]\nurl = 'http://h/mcp'\nargs = ['a']", "unknown key(s) ['args']"),
        ("[mcp.'a b']\nurl = 'http://h/mcp'", "1 to 32 of"),
        ("[mcp.x]\ncommand = 'a'\ncwd = 'nowhere'", "is not a folder"),
        ("[mcp.x]\ncommand = 'a'\ntimeout_s = 0", "timeout_s"),
        ("[mcp.x]\ncommand = 'a'\nprefix = 'a.b'", "prefix"),
        ("[python]\nmodules = 'a'", "list of non-empty strings"),
        ("[tool]\nx = 1", "unknown key(s) ['tool']"),
        ("builtins = 'all'", "builtins must be a list"),
        ("[mcp.x", "cannot read tools file"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ValueError, match="tools") as raised:
        load(tmp_path, text)
    assert says in str(raised.value)


@pytest.mark.parametrize(
    ("tool", "prefix", "name"),
    [
        ("search", "web", "web_search"),
        ("search", "", "search"),
        ("get.file/v2", "fs", "fs_get_file_v2"),
        ("ü", "", "_"),
    ],
)
def test_public_names(tool: str, prefix: str, name: str) -> None:
    assert public_name(tool, prefix) == name


def test_long_names_stay_valid_and_distinct() -> None:
    first, second = public_name("a" * 80 + "1", "srv"), public_name("a" * 80 + "2", "srv")
    assert first != second
    assert VALID_NAME.fullmatch(first) and VALID_NAME.fullmatch(second)
    assert len(first) == 64


class Recorder:
    def __init__(self) -> None:
        self.emitted: list[ev.Event] = []

    def emit(self, event: ev.Event) -> None:
        self.emitted.append(event)


async def relay(*items: Any) -> tuple[str, ev.Done, list[ev.Event], bool]:
    closed = False

    async def agent() -> AsyncIterator[Any]:
        nonlocal closed
        try:
            for item in items:
                yield item
                await asyncio.sleep(0)
        finally:
            closed = True

    recorder = Recorder()
    text, done = await relay_agent(agent(), recorder, WorkerMetrics())  # type: ignore[arg-type]
    return text, done, recorder.emitted, closed


@pytest.mark.asyncio
async def test_an_agent_may_yield_strings_and_ends_at_done() -> None:
    call = ev.ToolCallStarted("c1", "t")
    text, done, emitted, closed = await relay(
        "a", ev.Token(""), call, ev.Token("b"), ev.Done("stop"), "never"
    )
    assert (text, done, closed) == ("ab", ev.Done("stop"), True)
    assert emitted == [ev.Token("a"), call, ev.Token("b")]
    text, done, emitted, closed = await relay("only")
    assert (text, done, closed) == ("only", ev.Done(), True)


@pytest.mark.asyncio
async def test_an_agent_yielding_something_else_fails_and_is_closed() -> None:
    with pytest.raises(TypeError, match="not an event it may send"):
        await relay("a", ev.Error("nope"))
    # The contract's JSON objects are events (test_custom_agent); others are not.
    for not_an_event in (
        {"tokens": "x"},
        {"token": "x", "extra": 1},
        {"tool_call": {"id": 1, "name": "calc"}},
        {"lifecycle": "done", "finish_reason": 3},
    ):
        with pytest.raises(TypeError, match="not an event it may send"):
            await relay(not_an_event)


@pytest.mark.asyncio
async def test_the_answer_is_the_text_after_the_last_tool_round_and_outputs_are_capped() -> None:
    long_call = ev.ToolResult("c1", "mine", {}, "y" * 50_000)
    text, _, emitted, _ = await relay("Let me look. ", ev.ToolsCalled([long_call]), "It is 14:00.")
    assert text == "It is 14:00."
    [called] = [e for e in emitted if isinstance(e, ev.ToolsCalled)]
    assert called.calls[0].output.startswith("y" * 20_000 + "\n[output cut: the tool returned")


def test_python_tool_names_must_suit_openai() -> None:
    def søk(query: str) -> str:
        """Search."""
        return query

    with pytest.raises(ValueError, match="tool names of 1 to 64"):
        FunctionTool(søk)
