"""Tools the model may call: plain typed functions, and the registry that runs them.

A tool is a function with typed parameters and a docstring; adding one is one module here
plus an entry in ``BUILTIN_TOOLS``. Decisions a reader might want to undo:

- The JSON schema sent to the model is derived from the signature with pydantic (one
  model per tool, built once), so the schema and the argument validation cannot disagree.
  The description is the docstring's first paragraph; per-argument descriptions come from
  ``Annotated[..., Field(description=...)]``. Titles are dropped (noise for the model) and
  unknown arguments are refused (``additionalProperties: false``) so a misspelt argument
  is reported instead of silently defaulted.
- :meth:`ToolRegistry.run` never raises for anything the model or a tool did wrong: each
  problem becomes ``ok=False`` and an output starting with ``error: `` that the model can
  read and act on. Only cancellation (the job being stopped) propagates.
- Empty arguments (``""``) count as ``{}``: some OpenAI-compatible servers send that for a
  call without arguments.
- Sync tools run in a thread so the timeout holds for the caller; a thread cannot be
  killed, though, so a sync tool must bound its own work (the calculator refuses
  oversized inputs) rather than rely on the timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic

from .calculator import calculator
from .current_time import current_time

__all__ = ["BUILTIN_TOOLS", "Tool", "ToolRegistry", "ToolRun"]

logger = logging.getLogger(__name__)

BUILTIN_TOOLS: list[Callable[..., Any]] = [calculator, current_time]


@dataclass(frozen=True)
class ToolRun:
    """One call's outcome, as published in ``tools_called`` and sent back to the model."""

    arguments: Any  # the parsed JSON, or the raw string when the model sent invalid JSON
    output: str
    ok: bool


class Tool:
    """One function with the argument model and schema derived from its signature."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.name: str = func.__name__
        doc = inspect.getdoc(func)
        if not doc:
            raise ValueError(f"tool {self.name!r} needs a docstring: it is the model's guide")
        self.description = " ".join(doc.split("\n\n")[0].split())
        self.is_async = inspect.iscoroutinefunction(func)
        self.arguments_model = _arguments_model(func)
        self.parameters = _clean_schema(self.arguments_model.model_json_schema())

    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class ToolRegistry:
    """The tools one worker offers, by name; validates and runs the model's calls."""

    def __init__(self, tools: Sequence[Callable[..., Any]]) -> None:
        self._tools: dict[str, Tool] = {}
        for func in tools:
            tool = Tool(func)
            if tool.name in self._tools:
                raise ValueError(f"two tools are named {tool.name!r}")
            self._tools[tool.name] = tool

    @classmethod
    def from_setting(cls, enabled: str) -> ToolRegistry:
        """Tools from a setting: "" or "none", "*" or "all", or comma-separated names."""
        value = enabled.strip()
        if value.lower() in ("", "none"):
            return cls([])
        if value.lower() in ("*", "all"):
            return cls(BUILTIN_TOOLS)
        builtin = {func.__name__: func for func in BUILTIN_TOOLS}
        chosen: dict[str, Callable[..., Any]] = {}
        for raw in value.split(","):
            name = raw.strip()
            if not name:
                continue
            if name not in builtin:
                known = ", ".join(builtin)
                raise ValueError(f"unknown tool {name!r}; the built-in tools are: {known}")
            chosen[name] = builtin[name]
        return cls(list(chosen.values()))

    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """The OpenAI ``tools`` request parameter."""
        return [tool.schema() for tool in self._tools.values()]

    async def run(self, name: str, arguments: str, timeout_s: float) -> ToolRun:
        """Validate and run one call; every problem is an ``error: ...`` output, not a raise."""
        try:
            parsed: Any = json.loads(arguments) if arguments.strip() else {}
            json_problem = ""
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            parsed, json_problem = arguments, str(exc) or type(exc).__name__
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(self._tools) or "none"
            return _failed(parsed, f"there is no tool named {name!r} (available: {known})")
        if json_problem:
            return _failed(parsed, f"the arguments are not valid JSON ({json_problem})")
        if not isinstance(parsed, dict):
            return _failed(parsed, "the arguments must be a JSON object")
        try:
            validated = tool.arguments_model.model_validate(parsed)
        except pydantic.ValidationError as exc:
            return _failed(parsed, f"invalid arguments for {name}: {_describe(exc)}")
        kwargs = dict(validated)  # shallow: each argument as validated, not re-dumped

        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                if tool.is_async:
                    output = await tool.func(**kwargs)
                else:
                    output = await asyncio.to_thread(tool.func, **kwargs)
        except TimeoutError as exc:
            if deadline.expired():
                return _failed(parsed, f"{name} did not finish within {timeout_s:g} s")
            return _failed(parsed, f"{name} failed: {exc or 'it timed out'}")
        except ValueError as exc:  # the tool refusing its input, in words
            return _failed(parsed, str(exc) or f"{name} refused its arguments")
        except Exception as exc:
            logger.exception("tool %s failed", name)
            # Its text stays in the log: it may name hosts, paths or data users must not see.
            return _failed(parsed, f"{name} failed unexpectedly ({type(exc).__name__})")
        return ToolRun(parsed, output if isinstance(output, str) else str(output), ok=True)


def _failed(arguments: Any, message: str) -> ToolRun:
    return ToolRun(arguments, f"error: {message}", ok=False)


def _describe(exc: pydantic.ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(parts)


def _arguments_model(func: Callable[..., Any]) -> type[pydantic.BaseModel]:
    hints = typing.get_type_hints(func, include_extras=True)
    fields: dict[str, Any] = {}
    for param in inspect.signature(func).parameters.values():
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            raise ValueError(f"tool {func.__name__!r}: parameter {param.name!r} must be named")
        if param.name not in hints:
            raise ValueError(f"tool {func.__name__!r}: parameter {param.name!r} needs a type")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints[param.name], default)
    return pydantic.create_model(
        f"{func.__name__}_arguments",
        __config__=pydantic.ConfigDict(extra="forbid"),
        **fields,
    )


def _clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return schema
