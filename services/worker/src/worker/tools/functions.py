"""Python functions as tools: the built-ins and a team's own modules alike.

A tool is a plain function with typed parameters and a docstring; it needs nothing of
Streamgate's. Decisions a reader might want to undo:

- The JSON schema sent to the model is derived from the signature with pydantic (one model
  per tool, built once), so the schema and the argument validation cannot disagree. The
  description is the docstring's first paragraph; a parameter's description comes from
  ``Annotated[..., Field(description=...)]`` or else from the docstring's ``Args:`` (Google),
  ``Parameters`` (NumPy) or ``:param:`` (reST) section. Titles are dropped (noise for the
  model) and unknown arguments are refused (``additionalProperties: false``), so a
  misspelt argument is reported instead of silently defaulted.
- A ``ValueError`` raised by the function is the tool refusing its input, in words meant
  for the model; anything else is a bug.
- Sync functions run in a thread so the timeout and a cancel hold for the caller; a thread
  cannot be killed, though, so a sync tool must bound its own work (the calculator refuses
  oversized inputs) rather than rely on the timeout. A team's tools get their own pool,
  so theirs hanging never starves the built-ins.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docstring_parser
import pydantic

from .base import ToolFailure
from .naming import VALID_NAME

# Separate pools: a team's sync tools that hang (their threads cannot be killed) use up
# their own threads, never those of the built-ins.
_BUILTIN_THREADS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="builtin-tool")
_TEAM_THREADS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="python-tool")


class FunctionTool:
    """One function, with the argument model and schema derived from its signature."""

    def __init__(self, func: Callable[..., Any], source: str = "python") -> None:
        self.func = func
        self.name: str = func.__name__
        self.source = source
        if not VALID_NAME.fullmatch(self.name):
            raise ValueError(
                f"tool {self.name!r}: OpenAI takes tool names of 1 to 64 of A-Z a-z 0-9 _ -"
            )
        doc = inspect.getdoc(func)
        if not doc:
            raise ValueError(f"tool {self.name!r} needs a docstring: it is the model's guide")
        parsed = docstring_parser.parse(doc)
        self.description = " ".join(doc.split("\n\n")[0].split())
        self.is_async = inspect.iscoroutinefunction(func)
        self.arguments_model = _arguments_model(func)
        documented = {p.arg_name: p.description for p in parsed.params if p.description}
        try:
            generated = self.arguments_model.model_json_schema()
        except pydantic.PydanticUserError as exc:  # a type with no JSON form
            raise ValueError(f"tool {self.name!r}: {exc}") from exc
        self.parameters = _clean_schema(generated, documented)

    async def call(self, arguments: dict[str, Any]) -> str:
        try:
            validated = self.arguments_model.model_validate(arguments)
        except pydantic.ValidationError as exc:
            raise ToolFailure(f"invalid arguments for {self.name}: {_describe(exc)}") from None
        kwargs = dict(validated)  # shallow: each argument as validated, not re-dumped
        try:
            if self.is_async:
                output = await self.func(**kwargs)
            else:
                call = functools.partial(self.func, **kwargs)
                threads = _BUILTIN_THREADS if self.source == "builtin" else _TEAM_THREADS
                output = await asyncio.get_running_loop().run_in_executor(threads, call)
        except ValueError as exc:  # the tool refusing its input, in words
            raise ToolFailure(str(exc) or f"{self.name} refused its arguments") from exc
        return output if isinstance(output, str) else str(output)


def module_tools(module_name: str) -> list[FunctionTool]:
    """The tools a module lists in ``TOOLS``; ValueError says what is wrong with it."""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # its own import errors too: they stop the start, named
        raise ValueError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    listed = getattr(module, "TOOLS", None)
    if not isinstance(listed, list | tuple):
        raise ValueError(f"module {module_name!r} has no TOOLS list naming its tool functions")
    tools = []
    for func in listed:
        if not callable(func) or not hasattr(func, "__name__"):
            raise ValueError(f"{module_name}.TOOLS holds {func!r}, which is not a function")
        try:
            tools.append(FunctionTool(func))
        except ValueError as exc:
            raise ValueError(f"{module_name}: {exc}") from None
    return tools


def _describe(exc: pydantic.ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(parts)


def _arguments_model(func: Callable[..., Any]) -> type[pydantic.BaseModel]:
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception as exc:  # a hint naming something the module never imported
        raise ValueError(f"tool {func.__name__!r}: its type hints do not resolve ({exc})") from exc
    fields: dict[str, Any] = {}
    for param in inspect.signature(func).parameters.values():
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            raise ValueError(f"tool {func.__name__!r}: parameter {param.name!r} must be named")
        if param.name not in hints:
            raise ValueError(f"tool {func.__name__!r}: parameter {param.name!r} needs a type")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints[param.name], default)
    try:
        return pydantic.create_model(
            f"{func.__name__}_arguments",
            __config__=pydantic.ConfigDict(extra="forbid"),
            **fields,
        )
    except (pydantic.PydanticUserError, pydantic.PydanticSchemaGenerationError) as exc:
        raise ValueError(f"tool {func.__name__!r}: {exc}") from exc


def _clean_schema(schema: dict[str, Any], documented: dict[str, str]) -> dict[str, Any]:
    schema.pop("title", None)
    for name, prop in schema.get("properties", {}).items():
        prop.pop("title", None)
        if "description" not in prop and name in documented:
            prop["description"] = " ".join(documented[name].split())
    return schema
