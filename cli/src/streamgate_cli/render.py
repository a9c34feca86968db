"""Terminal output: the answer as text, or every event as one JSON line.

Tokens are written as they come and flushed one by one, so the answer appears live even
through a pipe. Tool activity gets lines of its own; the text renderer remembers whether
the cursor is at the start of a line so it never glues a tool line to the answer, nor adds
blank lines. Errors are not written here: the caller prints them on stderr.

On a terminal, the text of a model or a tool must not drive the terminal: an escape
sequence could retitle or clear it, a ``\\r`` rewrite a line already shown. So every C0 and
C1 control but newline and tab is shown as a ``\\xNN`` escape there (``shown``). Anywhere
else (a pipe, a file) the text stays exact, so that the tokens still add up to the model's
answer. ``--json`` needs nothing: JSON escapes every control.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, TextIO

from .client import Event

TOOL_MARK = "⚙"
# C0 controls but tab and newline, DEL, and C1 controls, each as its escape.
_CONTROLS = {
    code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0)) if chr(code) not in "\t\n"
}


class Renderer(Protocol):
    def event(self, event: Event) -> None: ...

    def end_line(self) -> None:
        """Finish the current line, before a message on stderr or the exit."""


class TextRenderer:
    """The answer as text; ``terminal`` shows control characters as escapes (see above)."""

    def __init__(self, out: TextIO, terminal: bool = False) -> None:
        self.out = out
        self.terminal = terminal
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
        self.out.write(shown(text) if self.terminal else text)
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
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f"{TOOL_MARK} {call.get('name', '?')} {text} → {call.get('output', '')}"


def shown(text: str) -> str:
    """``text`` made safe for a terminal: its controls but newline and tab as escapes."""
    return text.translate(_CONTROLS)
