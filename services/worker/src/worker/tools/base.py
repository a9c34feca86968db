"""What every tool is to the registry, wherever it runs: a name, a schema, and ``call``.

A tool reports a problem the model should read by raising :class:`ToolFailure`; the
registry turns it into an ``error: ...`` output. Anything else it raises is a bug, logged
with its traceback and shown to the model only by its type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class ToolFailure(Exception):
    """The call failed in a way the model can read and act on; the message says how."""


class Tool(Protocol):
    name: str  # as the model sees it: ^[a-zA-Z0-9_-]{1,64}$
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    source: str  # "builtin", "python" or "mcp:<server>"

    async def call(self, arguments: dict[str, Any]) -> str: ...


@dataclass(frozen=True)
class ToolRun:
    """One call's outcome, as published in ``tools_called`` and sent back to the model."""

    arguments: Any  # the parsed JSON, or the raw string when the model sent invalid JSON
    output: str
    ok: bool


def describe(tool: Tool) -> dict[str, Any]:
    """The tool as ``GET /tools`` lists it."""
    return {
        "name": tool.name,
        "description": tool.description,
        "source": tool.source,
        "parameters": tool.parameters,
    }


def schema(tool: Tool) -> dict[str, Any]:
    """The tool as the OpenAI ``tools`` request parameter offers it."""
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }
