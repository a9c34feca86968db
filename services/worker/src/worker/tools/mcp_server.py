"""One MCP server, held for the worker's lifetime, and its tools.

A task per server (:meth:`McpServer.run`) owns the connection: the ``mcp`` SDK's
``Client`` is entered and left in that one task, as its task groups require. It connects at
start, lists the tools, and then watches: a failed call, a lost ``subscriptions/listen``
stream or a failed periodic re-list ends the session, and it reconnects with backoff
(RECONNECT_MIN_S doubling to RECONNECT_MAX_S). A stdio server is a child of the session,
so reconnecting restarts it. The tool list is fetched again when the server says it changed
(``notifications/tools/list_changed`` on handshake-era servers, ``subscriptions/listen`` on
2026-07-28 ones) and on every PROBE_S re-list, for servers that say nothing.

Calls come from the jobs' tasks. While the server is down, a call brings the next attempt
forward (unless one began under RECONNECT_EARLY_S ago) and waits up to RECONNECT_WAIT_S;
then it fails with an ``error: ...`` output for the model. A job cancelled mid-call cancels
the SDK's request, which tells the server (``notifications/cancelled``, or the request's
HTTP stream closed on 2026-07-28). A re-list that hangs past CONNECT_TIMEOUT_S counts as
a broken session, so a server that hangs rather than dies is replaced too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx2
import mcp_types
import orjson
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.session import IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import SubscriptionLost
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from .base import ToolFailure
from .naming import public_name
from .tools_file import McpServerConfig

logger = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.25
RECONNECT_MAX_S = 5.0
CONNECT_TIMEOUT_S = 10.0  # the handshake and first listing
PROBE_S = 10.0  # re-list: notices a dead server and a changed list nobody announced
RECONNECT_WAIT_S = 2.0  # a call to a server that is down waits this long for it to return
RECONNECT_EARLY_S = 1.0  # a call brings the next attempt forward if the last is this old
MAX_RESPONSE_BYTES = 32 << 20  # an SSE event larger than this is refused (JSON and stdio
# answers are not bounded by the SDK; outputs are capped after the answer is read)
_CLOSED = (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)


_PYTHON = ("python", "python3")


def _interpreter(command: str) -> str:
    """``python`` is the worker's own interpreter: the one with the project's packages (the
    MCP SDK a Python server needs), where ``PATH`` may hold another, or none by that name."""
    return sys.executable if command in _PYTHON else command


def _python_env(command: str) -> dict[str, str]:
    """For a server run by the worker's interpreter, the worker's ``PYTHONPATH``, if set:
    its own modules, beside the SDK's safe environment, which leaves it out (a server's
    ``env`` may override it). Another program (``uvx``, ``node``) is not given it: it could
    shadow that one's packages."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": path} if path and _interpreter(command) == sys.executable else {}


class McpTool:
    """One of a server's tools, under the name the model sees."""

    def __init__(self, server: McpServer, remote: mcp_types.Tool) -> None:
        self.server = server
        self.remote_name = remote.name
        self.name = public_name(remote.name, server.config.prefix)
        self.description = remote.description or remote.title or remote.name
        self.parameters: dict[str, Any] = dict(remote.input_schema)
        self.source = f"mcp:{server.name}"
        self.timeout_s = server.config.timeout_s

    async def call(self, arguments: dict[str, Any]) -> str:
        return await self.server.call(self.remote_name, arguments)


class McpServer:
    def __init__(self, config: McpServerConfig, on_change: Callable[[], None]) -> None:
        self.config = config
        self.name = config.name
        self.tools: list[McpTool] = []  # the last listing; kept while the server is down
        self.last_error = "not connected yet"
        self._on_change = on_change
        self._client: Client | None = None
        self._up = asyncio.Event()
        self._tried = asyncio.Event()  # the first attempt is over, whatever its outcome
        self._broken = False
        self._wake = asyncio.Event()  # broken, or the tool list changed
        self._retry_now = asyncio.Event()
        self._last_attempt = 0.0
        self._scope: anyio.CancelScope | None = None  # made in run(): anyio needs the loop

    async def first_attempt(self) -> None:
        await self._tried.wait()

    async def run(self) -> None:
        """Connect, watch, reconnect, until :meth:`stop`. Timeouts and the stop are anyio
        cancel scopes, not ``task.cancel()``: the SDK shields its teardown (closing a stdio
        child) from anyio cancellation only, and a native cancel arriving mid-teardown left
        the child running and this task stuck."""
        delay = RECONNECT_MIN_S
        self._scope = scope = anyio.CancelScope()
        with scope:
            while True:
                was_up = False
                self._last_attempt = time.monotonic()
                try:
                    # One scope around the whole session (the SDK's own scopes must nest in
                    # it); its deadline bounds the handshake and first listing only.
                    deadline = anyio.current_time() + CONNECT_TIMEOUT_S
                    with anyio.CancelScope(deadline=deadline) as connecting:
                        async with self._new_client() as client:
                            await self._list(client)
                            connecting.deadline = math.inf
                            was_up = True
                            await self._serve(client)
                    if connecting.cancelled_caught:
                        raise TimeoutError
                except Exception as exc:
                    if scope.cancel_called:
                        return
                    self.last_error = _reason(exc)
                    level = logging.WARNING if was_up or not self._tried.is_set() else logging.DEBUG
                    logger.log(level, "MCP server %s: %s", self.name, self.last_error)
                finally:
                    self._client = None
                    self._up.clear()
                    self._tried.set()
                if was_up:
                    delay = RECONNECT_MIN_S
                with anyio.move_on_after(delay):
                    await self._retry_now.wait()
                self._retry_now.clear()
                delay = min(delay * 2, RECONNECT_MAX_S)

    async def stop(self) -> None:
        """End the session (a stdio server is stopped) and the task running :meth:`run`."""
        if self._scope is not None:
            self._scope.cancel()

    async def call(self, tool: str, arguments: dict[str, Any]) -> str:
        client = self._client
        if client is None:
            # The next attempt comes now, or once the last is a second old: a server back up
            # is used at once, one that crashes at start is not hammered.
            since = time.monotonic() - self._last_attempt
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECONNECT_WAIT_S):
                    await asyncio.sleep(max(0.0, RECONNECT_EARLY_S - since))
                    self._retry_now.set()
                    await self._up.wait()
            client = self._client
            if client is None:
                raise ToolFailure(
                    f"the MCP server {self.name!r} is unreachable ({self.last_error});"
                    " the worker keeps reconnecting, try again later"
                )
        try:
            result = await client.call_tool(tool, arguments)
        except MCPError as exc:
            if exc.code == mcp_types.CONNECTION_CLOSED:
                self._lost(client, exc.message)
                raise ToolFailure(
                    f"the MCP server {self.name!r} went away during the call"
                ) from exc
            raise ToolFailure(
                f"the MCP server {self.name!r} refused the call: {exc.message}"
            ) from exc
        except (OSError, httpx2.HTTPError, *_CLOSED) as exc:
            self._lost(client, _reason(exc))
            raise ToolFailure(
                f"the MCP server {self.name!r} went away during the call ({_reason(exc)})"
            ) from exc
        text = result_text(result)
        if result.is_error:
            raise ToolFailure(text or f"{tool} on MCP server {self.name!r} failed")
        return text

    def _lost(self, client: Client, reason: str) -> None:
        """The session of ``client`` broke: no call goes to it any more; reconnect."""
        if client is not self._client:
            return  # an earlier session's news
        self._client = None
        self._up.clear()
        self.last_error = reason
        self._broken = True
        self._wake.set()

    def _new_client(self) -> Client:
        config = self.config
        server: Any
        if config.url:
            http = httpx2.AsyncClient(
                headers=config.headers,
                timeout=httpx2.Timeout(CONNECT_TIMEOUT_S, read=None),  # calls: TOOL_TIMEOUT_S
            )
            server = _ClosingTransport(
                http,
                streamable_http_client(
                    config.url, http_client=http, max_sse_event_size=MAX_RESPONSE_BYTES
                ),
            )
        else:
            server = StdioServerParameters(
                command=_interpreter(config.command),
                args=config.args,
                env=_python_env(config.command) | config.env,
                cwd=config.cwd,
            )
        return Client(server, message_handler=self._on_message, cache=None)

    async def _on_message(self, message: IncomingMessage) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            self._wake.set()

    async def _serve(self, client: Client) -> None:
        """Publish the session, then watch it until it breaks (raises)."""
        self._broken = False
        self._client = client
        self._up.set()
        self._tried.set()
        self.last_error = ""
        logger.info(
            "MCP server %s connected (%s, protocol %s): %d tools",
            self.name,
            self.config.transport,
            client.protocol_version,
            len(self.tools),
        )
        listening = None
        tools_capability = client.server_capabilities.tools
        modern = client.protocol_version in MODERN_PROTOCOL_VERSIONS
        if modern and tools_capability is not None and tools_capability.list_changed:
            listening = asyncio.create_task(self._listen(client))
        try:
            while True:
                with anyio.move_on_after(PROBE_S):
                    await self._wake.wait()
                self._wake.clear()
                if self._broken:
                    raise ConnectionError(self.last_error or "the connection broke")
                with anyio.fail_after(CONNECT_TIMEOUT_S):  # a hung server is a broken one
                    await self._list(client)
        finally:
            if listening is not None:
                listening.cancel()
                with contextlib.suppress(BaseException):
                    await listening

    async def _listen(self, client: Client) -> None:
        try:
            async with client.listen(tools_list_changed=True) as subscription:
                async for _ in subscription:
                    self._wake.set()
        except (SubscriptionLost, MCPError, OSError, httpx2.HTTPError) as exc:
            self._lost(client, f"its change notifications stopped ({_reason(exc)})")

    async def _list(self, client: Client) -> None:
        listed: list[mcp_types.Tool] = []
        cursor: str | None = None
        for _ in range(100):  # a server paging forever cannot hang the worker
            page = await client.list_tools(cursor=cursor)
            listed += page.tools
            cursor = page.next_cursor
            if cursor is None:
                break
        offered = self.config.tools
        tools = [
            McpTool(self, remote)
            for remote in listed
            if offered is None or any(fnmatch.fnmatchcase(remote.name, p) for p in offered)
        ]
        if [(t.name, t.description, t.parameters) for t in tools] != [
            (t.name, t.description, t.parameters) for t in self.tools
        ]:
            self.tools = tools
            self._on_change()


class _ClosingTransport:
    """The streamable HTTP transport, closing the HTTP client it was given when it ends."""

    def __init__(self, http: httpx2.AsyncClient, transport: Any) -> None:
        self._http = http
        self._transport = transport

    async def __aenter__(self) -> Any:
        await self._http.__aenter__()
        try:
            return await self._transport.__aenter__()
        except BaseException:
            await self._http.aclose()
            raise

    async def __aexit__(self, *exc: Any) -> bool | None:
        try:
            return await self._transport.__aexit__(*exc)  # type: ignore[no-any-return]
        finally:
            await self._http.aclose()


def result_text(result: mcp_types.CallToolResult) -> str:
    """What the model reads of a result: its text; other content named, not inlined."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, mcp_types.ImageContent | mcp_types.AudioContent):
            parts.append(f"[{block.type}: {block.mime_type}, not shown]")
        elif isinstance(block, mcp_types.EmbeddedResource):
            resource = block.resource
            text = getattr(resource, "text", None)
            parts.append(text if isinstance(text, str) else f"[resource {resource.uri}, not shown]")
        elif isinstance(block, mcp_types.ResourceLink):
            parts.append(f"[resource {block.uri}]")
    if not parts and result.structured_content is not None:
        return orjson.dumps(result.structured_content).decode()
    return "\n".join(parts)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_reason(inner) for inner in exc.exceptions)
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
