"""The tools one worker offers, from every source, and the runner a job calls them through.

- Names are unique: two built-in or Python tools with one name stop the start; an MCP
  tool whose name is taken (its server listed it later) is left out, with a warning.
- :meth:`Toolbox.run` never raises for anything the model or a tool did wrong: each problem
  becomes ``ok=False`` and an output starting with ``error: `` that the model can read and
  act on. Only cancellation (the job being stopped) propagates.
- Empty arguments (``""``) count as ``{}``: some OpenAI-compatible servers send that for a
  call without arguments.
- Every call is bounded in time (TOOL_TIMEOUT_S, or its MCP server's ``timeout_s``) and its
  output in size (TOOL_OUTPUT_MAX_CHARS), the cut said at the end of the output.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from shared import events as ev
from shared import tracing

from .base import Tool, ToolFailure, ToolRun, describe, schema
from .mcp_server import CONNECT_TIMEOUT_S, McpServer
from .tools_file import McpServerConfig

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0  # for every MCP session to end, stdio servers stopped


class ToolRegistry:
    def __init__(
        self,
        tools: Sequence[Tool] = (),
        mcp: Sequence[McpServerConfig] = (),
        timeout_s: float = 10.0,
        output_max_chars: int = 20_000,
    ) -> None:
        self._static: dict[str, Tool] = {}
        for tool in tools:
            if (other := self._static.get(tool.name)) is not None:
                raise ValueError(
                    f"two tools are named {tool.name!r}: {_origin(other)} and {_origin(tool)};"
                    " rename one (a Python tool is named after its function)"
                )
            self._static[tool.name] = tool
        self.changed = asyncio.Event()  # an MCP server's tool list changed
        self.servers = [McpServer(config, self.changed.set) for config in mcp]
        self.timeout_s = timeout_s
        self.output_max_chars = output_max_chars
        self.on_run: Callable[[str, bool], None] | None = None  # (tool, ok): for metrics
        self.trace_content = False  # arguments and outputs in spans (LOG_PROMPTS)
        self._tasks: list[asyncio.Task[None]] = []
        self._shadowed: set[tuple[str, str]] = set()

    def tools(self) -> list[Tool]:
        """Every tool offered now: built-ins, Python, then each MCP server's last listing."""
        chosen = dict(self._static)
        for server in self.servers:
            for tool in server.tools:
                if tool.name not in chosen:
                    chosen[tool.name] = tool
                elif (tool.source, tool.name) not in self._shadowed:
                    self._shadowed.add((tool.source, tool.name))
                    logger.warning(
                        "%s's tool %r is left out: %s already has that name (set a prefix)",
                        tool.source,
                        tool.name,
                        chosen[tool.name].source,
                    )
        return list(chosen.values())

    def names(self) -> list[str]:
        return [tool.name for tool in self.tools()]

    def describe(self) -> list[dict[str, Any]]:
        return [describe(tool) for tool in self.tools()]

    def schemas(self) -> list[dict[str, Any]]:
        return self.offered(None).schemas()

    def offered(self, patterns: Sequence[str] | None) -> Toolbox:
        """The tools a role offers: all for None, else those matching a pattern (glob)."""
        tools = [
            tool
            for tool in self.tools()
            if patterns is None or any(fnmatch.fnmatchcase(tool.name, p) for p in patterns)
        ]
        return Toolbox(self, tools)

    async def start(self) -> None:
        """Connect to the MCP servers: return once each has connected or failed once (it
        keeps trying in the background), so the first jobs see every server that is up."""
        for server in self.servers:
            self._tasks.append(asyncio.create_task(server.run(), name=f"mcp:{server.name}"))
        if self.servers:
            waits = [server.first_attempt() for server in self.servers]
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S + 1):
                    await asyncio.gather(*waits)
            except TimeoutError:
                pass

    async def close(self) -> None:
        """Stop every MCP session (and stdio server); bounded, so a shutdown never hangs."""
        for server in self.servers:
            await server.stop()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT_S)
            for task in stuck:
                logger.warning("MCP session %s did not stop in time", task.get_name())
                task.cancel()
        self._tasks.clear()

    async def run(self, name: str, arguments: str) -> ToolRun:
        return await self.offered(None).run(name, arguments)


class Toolbox:
    """The tools one job may call: what it offers the model, and how it runs their calls."""

    def __init__(self, registry: ToolRegistry, tools: list[Tool]) -> None:
        self._registry = registry
        self._tools = {tool.name: tool for tool in tools}

    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """The OpenAI ``tools`` request parameter."""
        return [schema(tool) for tool in self._tools.values()]

    async def run(self, name: str, arguments: str, call_id: str | None = None) -> ToolRun:
        """Validate and run one call; every problem is an ``error: ...`` output, not a raise.
        Traced as a GenAI ``execute_tool`` span when tracing is on."""
        if not tracing.enabled():
            return await self._counted(name, arguments)
        attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name}
        if call_id:
            attributes["gen_ai.tool.call.id"] = call_id
        tool = self._tools.get(name)
        if tool is not None:
            attributes["streamgate.tool.source"] = tool.source
        if self._registry.trace_content:
            attributes["gen_ai.tool.call.arguments"] = arguments
        with tracing.span(f"execute_tool {name}", attributes=attributes) as span:
            run = await self._counted(name, arguments)
            if span is not None and self._registry.trace_content:
                span.set_attribute("gen_ai.tool.call.result", run.output)
            if not run.ok:  # its output may hold private data: only with LOG_PROMPTS
                shown = run.output if self._registry.trace_content else "the tool call failed"
                tracing.failed(span, shown, "tool_error")
            return run

    async def _counted(self, name: str, arguments: str) -> ToolRun:
        run = await self._run(name, arguments)
        if self._registry.on_run is not None:
            self._registry.on_run(name if name in self._tools else "(unknown)", run.ok)
        # Well-formed: a lone surrogate in an output would fail its event and the next
        # request upstream alike (neither UTF-8 nor JSON carries one).
        output = ev.well_formed(run.output)
        return ToolRun(run.arguments, cap_output(output, self._registry.output_max_chars), run.ok)

    async def _run(self, name: str, arguments: str) -> ToolRun:
        parsed, json_problem = parse_arguments(arguments)
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(self._tools) or "none"
            return _failed(parsed, f"there is no tool named {name!r} (available: {known})")
        if json_problem:
            return _failed(parsed, json_problem)
        timeout_s = getattr(tool, "timeout_s", None) or self._registry.timeout_s
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                output = await tool.call(parsed)
        except TimeoutError as exc:
            if deadline.expired():
                return _failed(parsed, f"{name} did not finish within {timeout_s:g} s")
            return _failed(parsed, f"{name} failed: {exc or 'it timed out'}")
        except ToolFailure as exc:
            return _failed(parsed, str(exc))
        except Exception as exc:
            logger.exception("tool %s failed", name)
            # Its text stays in the log: it may name hosts, paths or data users must not see.
            return _failed(parsed, f"{name} failed unexpectedly ({type(exc).__name__})")
        return ToolRun(parsed, output, ok=True)


def _origin(tool: Tool) -> str:
    """Where a tool comes from, in words: ``builtin``, or its Python function's module."""
    function = getattr(tool, "func", None)
    module = getattr(function, "__module__", None)
    return f"{tool.source} ({module}.{tool.name})" if module else tool.source


def parse_arguments(arguments: str) -> tuple[Any, str]:
    """A call's arguments as ``tools_called`` shows them (the parsed JSON object, else the
    raw string; empty is ``{}``), and what is wrong with them for a tool, if anything."""
    try:
        parsed = ev.well_formed(json.loads(arguments)) if arguments.strip() else {}
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        return arguments, f"the arguments are not valid JSON ({str(exc) or type(exc).__name__})"
    if not isinstance(parsed, dict):
        return arguments, "the arguments must be a JSON object"
    try:  # what Python reads and the event cannot carry: a 65-bit number, 255 levels deep
        orjson.dumps({"tools_called": [{"arguments": parsed}]})  # as deep as in its event
    except orjson.JSONEncodeError as exc:
        return arguments, f"the arguments hold what cannot be passed on ({exc})"
    return parsed, ""


CUT_NOTE_MAX = 160  # characters the cut's note adds, at most


def cap_output(output: str, limit: int) -> str:
    """``output`` cut to ``limit`` characters, the cut said at its end (an output already
    cut is at most ``limit + CUT_NOTE_MAX`` long, and is left as it is)."""
    if len(output) <= limit or (
        len(output) <= limit + CUT_NOTE_MAX and output.endswith("(TOOL_OUTPUT_MAX_CHARS)]")
    ):
        return output
    return (
        f"{output[:limit]}\n[output cut: the tool returned {len(output):,} characters;"
        f" the first {limit:,} are shown (TOOL_OUTPUT_MAX_CHARS)]"
    )


def _failed(arguments: Any, message: str) -> ToolRun:
    return ToolRun(arguments, f"error: {message}", ok=False)
