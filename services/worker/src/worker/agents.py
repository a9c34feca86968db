"""The agent interface: what ``AGENT=package.module:function`` names, and what it gets.

An agent is an async generator function taking one :class:`AgentRequest` and yielding
events: :class:`Token` (or a plain ``str``), :class:`ToolCallStarted`, :class:`ToolsCalled`,
and optionally a last :class:`Done` carrying the finish reason and usage; or the same
events as the contract's JSON objects (``{"token": ...}``, ``{"tool_call": ...}``,
``{"tools_called": [...]}``, ``{"lifecycle": "done", ...}``, and ``{"error": ...}``, which
ends the job with that error as :class:`AgentError` does). Streamgate does the
rest: the queue, publishing each event as it is yielded, the final event, the worker's
liveness, resuming readers and cancelling. Raising :class:`AgentError` ends the job with
that message as its ``error`` event; any other exception ends it with a generic error and
its traceback in the worker's log.

Cancelling (DELETE, every reader gone past the grace, the job timeout) cancels the task
running the generator: the ``await`` it is in raises ``CancelledError``, so an agent stops
within the contract's second as long as it awaits. Work that does not await (a thread)
can poll ``request.cancelled``.

The built-in OpenAI tool loop (``agent.py``) is an agent like any other.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shared.events import (
    ClientToolCalls,
    Done,
    Event,
    Token,
    ToolCallStarted,
    ToolResult,
    ToolsCalled,
    Usage,
)
from shared.roles import Role

from .llm import Upstream
from .tools import Toolbox

__all__ = [
    "Agent",
    "AgentError",
    "AgentRequest",
    "Done",
    "Token",
    "ToolCallStarted",
    "ToolResult",
    "ToolsCalled",
    "Usage",
    "load_agent",
]


class AgentError(Exception):
    """The agent cannot answer; the message, in words for the user, is the ``error`` event."""


@dataclass
class AgentRequest:
    job_id: str
    messages: list[dict[str, Any]]  # the role's system prompt, the history, the new turn
    history: list[dict[str, Any]]  # the session's earlier turns (already in ``messages``)
    role: Role
    tools: Toolbox  # what the role offers: ``schemas()``, and ``run(name, arguments)``
    llm: Upstream  # the configured model: ``stream(messages, tools)``, or ``client`` (openai)
    params: dict[str, Any] = field(default_factory=dict)  # the client's sampling parameters
    client_tools: list[dict[str, Any]] | None = None  # tools the client runs (OpenAI API)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)  # set when stopped
    # What the agent's completed upstream requests reported, set while none is in flight:
    # a job that fails or is cancelled then still counts the tokens it spent.
    spent: Usage | None = None


E = TypeVar("E")

# What an agent may yield before its optional last ``Done`` (``str`` aside).
AGENT_EVENTS = (Token, ToolCallStarted, ToolsCalled, ClientToolCalls)

Agent = Callable[[AgentRequest], AsyncIterator[Event | str | dict[str, Any]]]


def event_of(item: dict[str, Any]) -> Event:
    """An event an agent yielded as the contract's JSON object; raises ``AgentError`` for
    an ``error`` (the job ends with it), ``TypeError`` for what is no event it may send."""
    try:
        if isinstance(item.get("error"), str) and len(item) == 1:
            raise AgentError(item["error"])
        if isinstance(item.get("token"), str) and len(item) == 1:
            return Token(item["token"])
        if "tool_call" in item and len(item) == 1:
            call = item["tool_call"]
            return ToolCallStarted(_text(call["id"]), _text(call["name"]))
        if isinstance(item.get("tools_called"), list) and len(item) == 1:
            return ToolsCalled(
                [
                    ToolResult(_text(c["id"]), _text(c["name"]), c["arguments"], _text(c["output"]))
                    for c in item["tools_called"]
                ]
            )
        finish = item.get("finish_reason")
        if item.get("lifecycle") == "done" and (finish is None or isinstance(finish, str)):
            usage = item.get("usage")
            counts: list[Any] = (
                [usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
                if isinstance(usage, dict)
                else []
            )  # checked as an agent's Done is: not whole counts, no usage
            return Done(item.get("finish_reason"), Usage(*counts) if counts else None)
    except (KeyError, TypeError, AttributeError):
        pass
    raise TypeError(f"the agent yielded {item!r}, which is not an event it may send")


def checked(event: E) -> E:
    """An event an agent yielded, if its fields are what the contract's JSON says (text
    where it says text; a tool call's arguments an object or the raw string); else
    ``TypeError``: published, a wrong type would reach clients that cannot read it. What
    JSON has no form for deeper in (a set inside the arguments) fails the event's write,
    which ends the job with an error (``Publisher.reject``): encoding it here too would
    encode every tool round twice."""
    try:
        if isinstance(event, Token):
            _text(event.text)
        elif isinstance(event, Done):
            if event.finish_reason is not None:
                _text(event.finish_reason)
        elif isinstance(event, ToolCallStarted):
            _texts(event.call_id, event.name)
        elif isinstance(event, ToolsCalled | ClientToolCalls):
            for call in event.calls:
                _texts(call.call_id, call.name, call.output if isinstance(call, ToolResult) else "")
                if not isinstance(call.arguments, dict | str):
                    raise TypeError("arguments: not an object or a string")
        return event
    except (TypeError, AttributeError) as exc:
        raise TypeError(f"the agent yielded {event!r}, which is not an event it may send") from exc


def _texts(*values: object) -> None:
    for value in values:
        _text(value)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def load_agent(spec: str) -> Agent:
    """The function ``package.module:function`` names; ValueError says what is wrong."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    agent = getattr(module, name, None)
    if agent is None:
        raise ValueError(f"module {module_name!r} has no {name!r}")
    # A function, or an object whose __call__ is one (as the built-in agent is).
    if not inspect.isasyncgenfunction(agent) and not inspect.isasyncgenfunction(
        type(agent).__call__
    ):
        raise ValueError(f"{spec} must be an async generator function (async def with yield)")
    return agent  # type: ignore[no-any-return]
