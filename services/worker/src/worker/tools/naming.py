"""The names the model sees: OpenAI takes ``^[a-zA-Z0-9_-]{1,64}$`` and unique names only.

An MCP server's tools are named ``<prefix>_<tool>``, the prefix being the server's name
unless its table says otherwise (``prefix = ""`` keeps the server's own names). The rule
depends on nothing but that server's own table, so adding a server never renames another's
tools. A name outside the alphabet has each other character replaced by ``_``; one longer
than 64 keeps 55 characters and ends with 8 hex digits of a hash of the whole name, so two
long names still differ.
"""

from __future__ import annotations

import hashlib
import re

MAX_NAME = 64
VALID_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_OUTSIDE = re.compile(r"[^A-Za-z0-9_-]")


def public_name(tool: str, prefix: str = "") -> str:
    """The name a tool is offered under."""
    full = f"{prefix}_{tool}" if prefix else tool
    name = _OUTSIDE.sub("_", full) or "_"
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(full.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9]}_{digest}"
    return name
