"""Roles: named system prompts from a TOML file, read once at start by gateway and worker.

A role may name the tools it offers (``tools = ["calculator", "tickets_*"]``, glob
patterns; ``[]`` for none); without ``tools`` it offers every tool the workers have.

The gateway refuses an unknown role before enqueueing; the worker turns the name into the
system prompt. Both read the same file, so they agree on what exists.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

BUILTIN_ROLES = Path(__file__).with_name("roles.toml")


@dataclass(frozen=True)
class Role:
    name: str
    description: str
    system_prompt: str
    tools: tuple[str, ...] | None = None  # names or glob patterns it offers; None: every tool


@dataclass(frozen=True)
class Roles:
    roles: dict[str, Role]
    default: str

    def get(self, name: str | None) -> Role | None:
        """The role called ``name`` (the default one for None), or None if unknown."""
        return self.roles.get(name or self.default)


def load_roles(path: str | Path | None = None) -> Roles:
    """Read and check a roles file; ValueError says what is wrong with it."""
    source = Path(path) if path else BUILTIN_ROLES
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read roles file {source}: {exc}") from exc
    table = data.get("roles")
    if not isinstance(table, dict) or not table:
        raise ValueError(f"roles file {source} has no [roles.NAME] tables")
    roles: dict[str, Role] = {}
    for name, fields in table.items():
        prompt = fields.get("system_prompt") if isinstance(fields, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"role {name!r} in {source} has no system_prompt")
        tools = fields.get("tools")
        if tools is not None and (
            not isinstance(tools, list) or not all(isinstance(t, str) and t for t in tools)
        ):
            raise ValueError(f"role {name!r} in {source}: tools must be a list of tool names")
        description = str(fields.get("description", ""))
        roles[name] = Role(name, description, prompt, None if tools is None else tuple(tools))
    default = data.get("default", next(iter(roles)))
    if default not in roles:
        raise ValueError(f"default role {default!r} is not defined in {source}")
    return Roles(roles, default)
