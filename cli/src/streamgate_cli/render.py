"""Terminal output: the answer as text, or every event as one JSON line.

Tokens are written as they come and flushed one by one, so the answer appears live even
through a pipe. Tool activity gets lines of its own; the text renderer remembers whether
the cursor is at the start of a line so it never glues a tool line to the answer, nor adds
blank lines. Errors are not written here: the caller prints them on stderr.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, TextIO

from .client import Event

TOOL_MARK = "⚙"


class Renderer(Protocol):
    def event(self, event: Event) -> None: ...

    def end_line(self) -> None:
        """Finish the current line, before a message on stderr or the exit."""


class TextRenderer:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.at_line_start = True

    def event(self, event: Event) -> None:
        data = event.data
        token = data.get("token")
        if isinstance(token, str):
            self._write(token)
        if isinstance(data.get("tool_call"), dict):
            self.end_line()
            self._write(f"{TOOL_MARK} calling {data['tool_call'].get('name', '?')}…\n")
        if isinstance(data.get("tools_called"), list):
            self.end_line()
            for call in data["tools_called"]:
                if isinstance(call, dict):
                    self._write(tool_line(call) + "\n")
        if data.get("lifecycle") == "done":
            self.end_line()

    def end_line(self) -> None:
        if not self.at_line_start:
            self._write("\n")

    def _write(self, text: str) -> None:
        if not text:
            return
        self.out.write(text)
        self.out.flush()
        self.at_line_start = text.endswith("\n")


class JsonRenderer:
    """One ``{"id": ..., "data": {...}}`` line per event, for scripts (``--json``)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def event(self, event: Event) -> None:
        self.out.write(json.dumps({"id": event.id, "data": event.data}) + "\n")
        self.out.flush()

    def end_line(self) -> None:
        pass


def tool_line(call: dict[str, Any]) -> str:
    """``⚙ calculator {"expression": "2 + 3"} → 5``: name, arguments and output."""
    arguments = call.get("arguments")
    shown = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f"{TOOL_MARK} {call.get('name', '?')} {shown} → {call.get('output', '')}"
