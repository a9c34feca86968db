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
| ``[error-mid]``    | a few tokens, then an error object in the stream                |
| ``[http N]``       | an HTTP error N (401, 429, 500, ...) before any token           |
| ``[stall]``        | a few tokens, then silence until the client gives up            |
| ``[echo]``         | the request's messages as JSON, to show what was sent upstream  |
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

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
    r"\[(hard|long|delay|wait|fail-mid|error-mid|http|stall|echo)(?:\s+([\d.]+))?\]"
)


@dataclass
class Script:
    tokens: list[str]
    delay_s: float
    http_status: int | None = None
    then: str | None = None  # "fail", "error" or "stall" after the tokens
    wait_s: float = 0.0  # silence before the first token
    extra: dict[str, Any] = field(default_factory=dict)


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


def plan(messages: list[dict[str, Any]], default_delay_s: float) -> Script:
    prompt = last_user_text(messages)
    directives = {name: arg for name, arg in _DIRECTIVE.findall(prompt)}
    delay = float(directives["delay"]) if directives.get("delay") else default_delay_s
    if "http" in directives:
        return Script([], delay, http_status=int(directives["http"] or 500))
    if "echo" in directives:
        return Script([orjson.dumps(messages).decode()], delay)
    if "hard" in directives:
        tokens = list(HARD_TOKENS)
    elif "long" in directives:
        count = int(directives["long"] or 1000)
        tokens = [f"t{i} " for i in range(count)]
    else:
        tokens = demo_answer(prompt)
    wait = float(directives["wait"]) if directives.get("wait") else 0.0
    for name, then in (("fail-mid", "fail"), ("error-mid", "error"), ("stall", "stall")):
        if name in directives:
            return Script(tokens[:3], delay, then=then, wait_s=wait)
    return Script(tokens, delay, wait_s=wait)
