"""The tools file (``TOOLS_FILE``): which built-ins, Python modules and MCP servers a worker
offers. Read and checked once at start; every mistake stops the start with a message that
names the file, the table and the key.

Secrets stay out of the file: ``${NAME}`` in a URL, header, argument or environment value is
replaced by the environment variable ``NAME`` when the worker starts, and a variable that is
not set is an error rather than an empty credential. Paths are the file's: a stdio server
runs in the file's folder unless ``cwd`` (itself relative to that folder) says otherwise, and
that folder is importable, so ``modules`` (and ``python -m`` servers) next to the file just
work.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_SERVER_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HTTP_KEYS = {"url", "headers"}
_STDIO_KEYS = {"command", "args", "env", "cwd"}
_COMMON_KEYS = {"prefix", "timeout_s", "tools"}


@dataclass(frozen=True)
class McpServerConfig:
    name: str
    prefix: str  # of its tools' names (naming.py); "" for none
    url: str = ""  # streamable HTTP, or else stdio:
    headers: dict[str, str] = field(default_factory=dict)
    command: str = ""
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout_s: float | None = None  # per call; None: TOOL_TIMEOUT_S
    tools: list[str] | None = None  # which of its tools to offer (glob patterns); None: all

    @property
    def transport(self) -> str:
        return "streamable HTTP" if self.url else "stdio"


@dataclass(frozen=True)
class ToolsConfig:
    builtins: list[str] | None = None  # None: as the TOOLS setting says
    modules: list[str] = field(default_factory=list)
    mcp: list[McpServerConfig] = field(default_factory=list)
    folder: Path | None = None  # the file's, for imports and relative paths


def load_tools_file(path: str | Path) -> ToolsConfig:
    source = Path(path)
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read tools file {source}: {exc}") from exc
    try:
        return _parse(data, source.resolve().parent)
    except ValueError as exc:
        raise ValueError(f"tools file {source}: {exc}") from None


def _parse(data: dict[str, Any], folder: Path) -> ToolsConfig:
    unknown = set(data) - {"builtins", "python", "mcp"}
    if unknown:
        raise ValueError(
            f"unknown key(s) {sorted(unknown)}: expected builtins, [python], [mcp.NAME]"
        )
    builtins = data.get("builtins")
    if builtins is not None:
        builtins = _strings(builtins, "builtins")
    python = data.get("python", {})
    if not isinstance(python, dict) or set(python) - {"modules"}:
        raise ValueError('[python] takes one key, modules = ["package.module", ...]')
    modules = _strings(python.get("modules", []), "[python] modules")
    servers = data.get("mcp", {})
    if not isinstance(servers, dict):
        raise ValueError("mcp must be tables: [mcp.NAME]")
    return ToolsConfig(
        builtins, modules, [_server(n, t, folder) for n, t in servers.items()], folder
    )


def _server(name: str, table: Any, folder: Path) -> McpServerConfig:
    where = f"[mcp.{name}]"
    if not _SERVER_NAME.fullmatch(name):
        raise ValueError(f"{where}: a server's name is 1 to 32 of A-Z a-z 0-9 _ -")
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table")
    has_url, has_command = "url" in table, "command" in table
    if has_url == has_command:
        raise ValueError(f"{where} needs either url (streamable HTTP) or command (stdio)")
    allowed = _COMMON_KEYS | (_HTTP_KEYS if has_url else _STDIO_KEYS)
    unknown = set(table) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; it takes {sorted(allowed)}")
    prefix = table.get("prefix", name)
    if not isinstance(prefix, str) or (prefix and not _SERVER_NAME.fullmatch(prefix)):
        raise ValueError(f'{where}: prefix is "" or 1 to 32 of A-Z a-z 0-9 _ -')
    timeout = table.get("timeout_s")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600
    ):
        raise ValueError(f"{where}: timeout_s is a number of seconds from 0 to 3600")
    offered = table.get("tools")
    common: dict[str, Any] = {
        "name": name,
        "prefix": prefix,
        "timeout_s": float(timeout) if timeout is not None else None,
        "tools": None if offered is None else _strings(offered, f"{where} tools"),
    }
    if has_url:
        url = _expand(_string(table["url"], f"{where} url"), f"{where} url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{where}: url must be an http:// or https:// URL")
        headers = _table(table.get("headers", {}), f"{where} headers")
        return McpServerConfig(url=url, headers=headers, **common)
    command = _expand(_string(table["command"], f"{where} command"), f"{where} command")
    args = [_expand(a, f"{where} args") for a in _strings(table.get("args", []), f"{where} args")]
    cwd = str(folder)
    if "cwd" in table:
        cwd = str(folder / _expand(_string(table["cwd"], f"{where} cwd"), f"{where} cwd"))
        if not Path(cwd).is_dir():
            raise ValueError(f"{where}: cwd {cwd} is not a folder")
    env = _table(table.get("env", {}), f"{where} env")
    return McpServerConfig(command=command, args=args, env=env, cwd=cwd, **common)


def _expand(value: str, where: str) -> str:
    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ValueError(f"{where} names ${{{name}}}, but the environment has no {name}")
        return os.environ[name]

    return _VARIABLE.sub(variable, value)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty string")
    return value


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where} must be a list of non-empty strings")
    return list(value)


def _table(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"{where} must be a table of strings")
    return {str(k): _expand(v, f"{where}.{k}") for k, v in value.items()}
