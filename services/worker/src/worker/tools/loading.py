"""A worker's tools, from its settings: the built-ins TOOLS (or the tools file) keeps on,
the tools file's Python modules, and its MCP servers."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from shared.settings import Settings

from .calculator import calculator
from .current_time import current_time
from .functions import FunctionTool, module_tools
from .registry import ToolRegistry
from .tools_file import ToolsConfig, load_tools_file

BUILTIN_TOOLS: list[Callable[..., Any]] = [calculator, current_time]


def check_tools(settings: Settings) -> tuple[ToolsConfig, list[FunctionTool]]:
    """The tools file, read, and the built-ins kept on: what can be checked without
    importing a module or starting a server. ValueError names the setting and says what is
    wrong with it."""
    config = ToolsConfig()
    if settings.tools_file:
        try:
            config = load_tools_file(settings.tools_file)
        except ValueError as exc:
            raise ValueError(f"TOOLS_FILE: {exc}") from None
    try:
        builtins = builtin_tools(settings.tools if config.builtins is None else config.builtins)
    except ValueError as exc:
        where = "TOOLS" if config.builtins is None else f"TOOLS_FILE: {settings.tools_file}"
        raise ValueError(f"{where}: {exc}") from None
    return config, builtins


def load_registry(settings: Settings) -> ToolRegistry:
    """ValueError names the setting and says what is wrong with it."""
    config, builtins = check_tools(settings)
    if config.folder is not None and config.modules and str(config.folder) not in sys.path:
        sys.path.append(str(config.folder))  # modules beside it import, shadowing nothing
    python: list[FunctionTool] = []
    for module in config.modules:
        try:
            python += module_tools(module)
        except ValueError as exc:
            raise ValueError(f"TOOLS_FILE: {settings.tools_file}: {exc}") from None
    try:
        registry = ToolRegistry(
            [*builtins, *python],
            config.mcp,
            timeout_s=settings.tool_timeout_s,
            output_max_chars=settings.tool_output_max_chars,
        )
        registry.trace_content = settings.log_prompts
        return registry
    except ValueError as exc:
        raise ValueError(f"TOOLS_FILE: {settings.tools_file}: {exc}") from None


def builtin_tools(enabled: str | list[str]) -> list[FunctionTool]:
    """The built-ins a setting keeps: "" or "none", "*" or "all", or their names (a list,
    or comma-separated)."""
    names = enabled.split(",") if isinstance(enabled, str) else enabled
    value = ",".join(name.strip() for name in names if name.strip()).lower()
    if value in ("", "none"):
        return []
    if value in ("*", "all"):
        return [FunctionTool(func, "builtin") for func in BUILTIN_TOOLS]
    builtin = {func.__name__: func for func in BUILTIN_TOOLS}
    chosen: dict[str, Callable[..., Any]] = {}
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name not in builtin:
            known = ", ".join(builtin)
            raise ValueError(f"unknown tool {name!r}; the built-in tools are: {known}")
        chosen[name] = builtin[name]
    return [FunctionTool(func, "builtin") for func in chosen.values()]
