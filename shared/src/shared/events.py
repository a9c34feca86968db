"""The events of a job's stream, as one JSON object each (see PROTOCOL.md, "The event stream").

Events are encoded once, by whoever appends them, and relayed as the same bytes: the gateway
never decodes a token on its way through. ``final`` travels beside the JSON in the stream
entry so a reader knows the end of a stream without parsing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Token:
    text: str

    def data(self) -> dict[str, Any]:
        return {"token": self.text}


@dataclass(frozen=True, slots=True)
class ToolCallStarted:
    call_id: str
    name: str

    def data(self) -> dict[str, Any]:
        return {"tool_call": {"id": self.call_id, "name": self.name}}


@dataclass(frozen=True, slots=True)
class ToolResult:
    call_id: str
    name: str
    arguments: Any  # the parsed JSON object, or the raw string when the model sent bad JSON
    output: str

    def data(self) -> dict[str, Any]:
        return {
            "id": self.call_id,
            "name": self.name,
            "arguments": self.arguments,
            "output": self.output,
        }


@dataclass(frozen=True, slots=True)
class ToolsCalled:
    calls: list[ToolResult] = field(default_factory=list)

    def data(self) -> dict[str, Any]:
        return {"tools_called": [call.data() for call in self.calls]}


@dataclass(frozen=True, slots=True)
class Queued:
    job_id: str
    position: int

    def data(self) -> dict[str, Any]:
        return {"lifecycle": "queued", "job_id": self.job_id, "position": self.position}


@dataclass(frozen=True, slots=True)
class Started:
    job_id: str

    def data(self) -> dict[str, Any]:
        return {"lifecycle": "started", "job_id": self.job_id}


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
        )

    def data(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class Done:
    finish_reason: str | None = None  # the model's: stop, length, content_filter, tool_calls
    usage: Usage | None = None  # summed over the job's upstream requests, when all reported it

    def data(self) -> dict[str, Any]:
        done: dict[str, Any] = {"lifecycle": "done"}
        if self.finish_reason:
            done["finish_reason"] = self.finish_reason
        if self.usage is not None:
            done["usage"] = self.usage.data()
        return done


@dataclass(frozen=True, slots=True)
class ClientToolCall:
    call_id: str
    name: str
    arguments: str  # as the model sent it: the client parses and runs it


@dataclass(frozen=True, slots=True)
class ClientToolCalls:
    """The model's calls of tools the client declared: the client runs them (OpenAI API)."""

    calls: list[ClientToolCall] = field(default_factory=list)

    def data(self) -> dict[str, Any]:
        return {
            "client_tool_calls": [
                {"id": c.call_id, "name": c.name, "arguments": c.arguments} for c in self.calls
            ]
        }


@dataclass(frozen=True, slots=True)
class Error:
    message: str

    def data(self) -> dict[str, Any]:
        return {"error": self.message}


Event = Token | ToolCallStarted | ToolsCalled | ClientToolCalls | Queued | Started | Done | Error

# Events that show the job has produced output: once one is published, the job never re-runs.
OUTPUT_EVENTS = (Token, ToolCallStarted, ToolsCalled, ClientToolCalls)


def is_final(event: Event) -> bool:
    return isinstance(event, Done | Error)


def encode(event: Event) -> bytes:
    data = event.data()
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:  # text with a lone surrogate, or a value JSON has not
        return orjson.dumps(well_formed(data))


def well_formed(value: Any) -> Any:
    """``value`` with every lone surrogate in its text (which Python's ``json`` reads from
    ``"\\ud800"``, and neither UTF-8 nor JSON can carry) made U+FFFD; the rest as it is."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {well_formed(k): well_formed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [well_formed(v) for v in value]
    return value


def decode(data: bytes | str) -> dict[str, Any]:
    """The JSON object of an event, for clients and tests; the relay never needs it."""
    value = orjson.loads(data)
    if not isinstance(value, dict):
        raise ValueError("an event is a JSON object")
    return value


# Errors with fixed wording, shared by whoever detects the failure.
CANCELLED = "cancelled"
WORKER_LOST = (
    "the worker running this job stopped responding; the answer is incomplete, please retry"
)
NO_WORKER = "no worker was available to start this job in time; please retry later"
JOB_LOST = "this job's events were lost (Redis restarted or evicted them); please retry"
REDIS_UNREACHABLE = (
    "the Redis holding this job has been unreachable too long: the job is lost; please retry"
)
CLIENT_GONE = "cancelled: every reader disconnected"
TOO_MANY_ATTEMPTS = (
    "this job stopped its worker several times before any answer; it will not be run again"
)
