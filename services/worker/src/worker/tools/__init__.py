"""Tools the model may call: built-ins, a team's Python modules and MCP servers.

``loading.py`` builds a worker's :class:`ToolRegistry` from its settings and tools file;
each job calls tools through the :class:`Toolbox` its role offers.
"""

from .base import Tool, ToolFailure, ToolRun
from .calculator import calculator
from .current_time import current_time
from .functions import FunctionTool
from .loading import BUILTIN_TOOLS, load_registry
from .registry import Toolbox, ToolRegistry

__all__ = [
    "BUILTIN_TOOLS",
    "FunctionTool",
    "Tool",
    "ToolFailure",
    "ToolRegistry",
    "ToolRun",
    "Toolbox",
    "calculator",
    "current_time",
    "load_registry",
]
