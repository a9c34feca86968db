"""What the demo model says: a labelled demo answer, or a hard case asked for in the prompt.

Directives in the last user message (square brackets, anywhere in the text):

| directive          | the stream                                                      |
|--------------------|-----------------------------------------------------------------|
| (none)             | the demo answer, word by word                                   |
| ``[hard]``         | tokens holding newlines, ``data:``, ``\\r``, emoji, other Unicode |
| ``[long N]``       | N numbered tokens                                               |
| ``[delay S]``      | S seconds between tokens (default ``DEMO_LLM_DELAY_S``)           |
| ``[wait S]``       | S seconds of silence before the first token                     |
| ``[fail-mid]``     | a few tokens, then the connection drops                         |
| ``[drop-end]``     | a few tokens and the finish reason, then the connection drops   |
|                    | (no usage, no ``[DONE]``: a whole answer whose end was lost)      |
| ``[error-mid]``    | a few tokens, then an error object in the stream                |
| ``[http N]``       | an HTTP error N (401, 429, 500, ...) before any token           |
| ``[stall]``        | a few tokens, then silence until the client gives up            |
| ``[echo]``         | the request's messages as JSON, to show what was sent upstream  |
| ``[params]``       | the request's other fields (but ``tools``) as JSON, likewise     |
| ``[tools]``        | the names of the tools the request offers, one token            |
| ``[markdown]``     | an answer in Markdown: headings, a list, a code block, a table  |
| ``[html]``         | an answer holding raw HTML that would run script if rendered as |
|                    | HTML unsanitized (``<img onerror>``, ``<script>``)               |
| ``[cut]``          | a few tokens, then the stream ends without ``[DONE]`` or a      |
|                    | finish reason (an incomplete answer)                            |
| ``[stamp]``        | each token ends with ``@<µs>``: when it was sent (the monotonic  |
|                    | clock), for benchmarks to measure the delay after the model      |

Tools, when the request offers them (``tools``): "calculate 2 + 3 * 4" calls ``calculator``,
"time" (optionally "time in Europe/Oslo") calls ``current_time``, both at once make two
parallel calls; the arguments stream in small pieces, as real models send them. After the
``tool`` messages come back, the answer reads the outputs. Directives for the hard cases:
``[tool-unknown]`` (a tool that does not exist), ``[tool-badjson]`` (arguments that are not
JSON), ``[tool-invalid]`` (arguments that fail validation), ``[tool-loop]`` (a tool call
in every round, to reach the round limit), ``[tool-noindex]`` (parallel calls without
``index``, as Ollama sends them). ``[call NAME {JSON}]`` calls any tool with exactly those
arguments (the JSON object is optional; several directives make parallel calls), for
trying a team's own tools.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import orjson

MARKDOWN_ANSWER = (
    "# A heading\n\nSome **bold** text and a [link](https://example.com/).\n\n"
    "- one\n- two\n- three\n\n"
    "```python\nprint('hello')\n```\n\n"
    "| name | value |\n|---|---|\n| a | 1 |\n| b | 2 |\n"
)
HTML_ANSWER = (
    'Look: <img src=x onerror="window.__pwned = 1"> and '
    "<script>window.__pwned = 2</script> and "
    '<a href="javascript:window.__pwned = 3">a link</a>.'
)

HARD_TOKENS = [
    "Hard cases:",
    "\n",
    "data: not an event",
    "\r",
    "\r\n",
    "\n\n",
    "id: 7",
    ": a comment?",
    "event: nope",
    " emoji 😀🎉👩‍👩‍👧",
    " 日本語",
    " Ünïcödé",
    " \u2028line-separator\u2029",
    ' "quotes" \\ backslash',
    "\t",
    "tab\x00nul",
    " end.",
]

_DIRECTIVE = re.compile(
    r"\[(hard|long|delay|wait|fail-mid|drop-end|error-mid|http|stall|echo|params|stamp|cut)(?:\s+([^\]\s]+))?\]"
)
# What each directive's number may be: anything else is a 400, not a crash, and no prompt
# makes the model hold more than one token at a time (``[long N]`` is made as it is sent).
LIMITS: dict[str, tuple[type[int] | type[float], float, float]] = {
    "long": (int, 1, 10_000_000),
    "delay": (float, 0, 60),
    "wait": (float, 0, 3600),
    "http": (int, 400, 599),
}


_JSON = json.JSONDecoder()
_ASCII_NUMBER = re.compile(r"[0-9]*\.?[0-9]+|[0-9]+\.")


class DirectiveError(ValueError):
    """A directive whose number is out of range or not a number."""


class NumberedTokens(Sequence[str]):
    """``t0 ``, ``t1 ``, ...: ``[long N]``'s tokens, made when asked for."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        if not -self.size <= index < self.size:
            raise IndexError(index)
        return f"t{index % self.size} "


@dataclass
class Script:
    tokens: Sequence[str]
    delay_s: float
    http_status: int | None = None
    then: str | None = None  # "fail", "drop-end", "error", "stall" or "cut" after the tokens
    wait_s: float = 0.0  # silence before the first token
    tool_calls: list[PlannedCall] = field(default_factory=list)
    with_index: bool = True  # False: tool call deltas without "index" (Ollama)
    stamp: bool = False  # each token ends with "@<µs>", the monotonic clock when sent


@dataclass
class PlannedCall:
    call_id: str
    name: str
    arguments: str  # sent in pieces


_CALCULATE = re.compile(r"calculate\s+([-+*/%().\d\s]+)", re.IGNORECASE)
_TIME = re.compile(r"\btime\b(?:\s+in\s+([A-Za-z_]+(?:/[A-Za-z_]+)*))?", re.IGNORECASE)


_CALL = re.compile(r"\[call\s+([A-Za-z0-9_-]{1,64})\s*")


def named_calls(prompt: str) -> list[tuple[str, str]]:
    """The ``[call NAME {JSON}]`` directives, as (name, arguments JSON)."""
    calls = []
    for match in _CALL.finditer(prompt):
        arguments: Any = {}
        end = match.end()
        if prompt.startswith("{", end):
            try:
                arguments, end = _JSON.raw_decode(prompt, end)
            except ValueError as exc:
                raise DirectiveError(f"[call {match.group(1)} ...]: the arguments: {exc}") from None
        if not isinstance(arguments, dict) or not prompt.startswith("]", end):
            raise DirectiveError("[call NAME {JSON object}]: a name, then a JSON object, then ]")
        calls.append((match.group(1), orjson.dumps(arguments).decode()))
    return calls


def plan_tool_calls(prompt: str) -> tuple[list[PlannedCall], bool]:
    """The calls the demo model makes for ``prompt``, and whether deltas carry an index."""
    calls: list[tuple[str, str]] = named_calls(prompt)  # when asked for, these alone
    if calls:
        return [PlannedCall(f"call_{uuid.uuid4().hex[:12]}", n, a) for n, a in calls], True
    if "[tool-unknown]" in prompt:
        calls.append(("weather", '{"city": "Oslo"}'))
    if "[tool-badjson]" in prompt:
        calls.append(("calculator", '{"expression": "1 +'))
    if "[tool-invalid]" in prompt:
        calls.append(("calculator", '{"expr": 5}'))
    if "[tool-loop]" in prompt:
        calls.append(("calculator", '{"expression": "1 + 1"}'))
    if match := _CALCULATE.search(prompt):
        calls.append(("calculator", orjson.dumps({"expression": match.group(1).strip()}).decode()))
    if match := _TIME.search(prompt):
        zone = {"timezone": match.group(1)} if match.group(1) else {}
        calls.append(("current_time", orjson.dumps(zone).decode()))
    planned = [PlannedCall(f"call_{uuid.uuid4().hex[:12]}", n, a) for n, a in calls]
    return planned, "[tool-noindex]" not in prompt


def answer_from_tools(messages: list[dict[str, Any]]) -> list[str]:
    """The demo's answer once tool results are back: it reads them out."""
    names: dict[str, str] = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            names[call.get("id", "")] = call.get("function", {}).get("name", "?")
    outputs = [
        f"{names.get(m.get('tool_call_id', ''), '?')} said {m.get('content')!s}"
        for m in messages
        if m.get("role") == "tool"
    ]
    return re.findall(r"\S+\s*", "From the tools: " + "; ".join(outputs) + ".")


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else orjson.dumps(content).decode()
    return ""


def demo_answer(prompt: str) -> list[str]:
    shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    text = (
        "[Streamgate demo model: a scripted answer, not a real LLM.] "
        f'You said: "{shown}". '
        "Point OPENAI_BASE_URL at OpenAI, vLLM, Ollama or any OpenAI-compatible server "
        "to talk to a real model."
    )
    return re.findall(r"\S+\s*", text)


def _number(directive: str, text: str) -> float:
    if directive not in LIMITS:
        raise DirectiveError(f"[{directive}] takes no number (got {text!r})")
    kind, low, high = LIMITS[directive]
    try:
        value = kind(text) if _ASCII_NUMBER.fullmatch(text) else None  # int() takes "١٢"
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        what, shown = ("a whole number", ",.0f") if kind is int else ("a number", "g")
        raise DirectiveError(
            f"[{directive} N]: N must be {what} from {low:{shown}} to {high:{shown}}"
        )
    return value


def plan(
    messages: list[dict[str, Any]],
    default_delay_s: float,
    tools: Sequence[str] = (),
    params: dict[str, Any] | None = None,
) -> Script:
    """What to send for these messages, ``tools`` being the names of the tools offered and
    ``params`` the request's other fields."""
    prompt = last_user_text(messages)
    directives = {name: arg for name, arg in _DIRECTIVE.findall(prompt)}
    numbers = {name: _number(name, arg) for name, arg in directives.items() if arg}
    delay = numbers.get("delay", default_delay_s)
    if "http" in directives:
        return Script([], delay, http_status=int(numbers.get("http", 500)))
    after_tools = bool(messages) and messages[-1].get("role") == "tool"
    if tools and (not after_tools or "[tool-loop]" in prompt):
        calls, with_index = plan_tool_calls(prompt)
        if calls:
            return Script([], delay, tool_calls=calls, with_index=with_index)
    if "[markdown]" in prompt or "[html]" in prompt:
        answer = MARKDOWN_ANSWER if "[markdown]" in prompt else HTML_ANSWER
        return Script(re.findall(r"\S+\s*|\s+", answer), delay)
    if "[tools]" in prompt:
        return Script([f"Tools offered: {', '.join(tools) or 'none'}."], delay)
    if "echo" in directives:
        return Script([orjson.dumps(messages).decode()], delay)
    if "params" in directives:
        return Script([orjson.dumps(params or {}).decode()], delay)
    if after_tools:
        return Script(answer_from_tools(messages), delay)
    tokens: Sequence[str]
    if "hard" in directives:
        tokens = list(HARD_TOKENS)
    elif "long" in directives:
        tokens = NumberedTokens(int(numbers.get("long", 1000)))
    else:
        tokens = demo_answer(prompt)
    wait = numbers.get("wait", 0.0)
    for name, then in (
        ("fail-mid", "fail"),
        ("drop-end", "drop-end"),
        ("error-mid", "error"),
        ("stall", "stall"),
        ("cut", "cut"),
    ):
        if name in directives:
            return Script(tokens[:3], delay, then=then, wait_s=wait)
    return Script(tokens, delay, wait_s=wait, stamp="stamp" in directives)
