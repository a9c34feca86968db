"""A job's events as the AI SDK's UI message stream (``x-vercel-ai-ui-message-stream: v1``).

One assistant message per job (its ``messageId`` is the job's id, so a replay on any
gateway is the same message): ``start``, then one step per model round (``start-step`` ...
``finish-step``). Tokens are a text block (``text-start``, ``text-delta`` each, ``text-end``)
closed when a tool call starts or the step ends. Streamgate's tools ran in the worker, so
each call is a dynamic tool (``dynamic: true``: the client did not declare it) that the
server ran (``providerExecuted: true``: ``useChat`` neither calls its ``onToolCall`` for it
nor sends the conversation again when a step ends with it):
``tool-input-start`` when it starts, then ``tool-input-available`` and
``tool-output-available`` when the results are in (an ``error: ...`` output too: the model
read it and answered on); the next round is a new step. ``done`` is ``finish`` with the
finish reason in the SDK's spelling; an ``error`` event is ``error`` with ``errorText``.
``data: [DONE]`` ends the stream.
"""

from __future__ import annotations

from typing import Any

import orjson

HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
DONE = b"data: [DONE]\n\n"
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
}
SERVER_TOOL = {"dynamic": True, "providerExecuted": True}  # every tool part's


class UIMessageParts:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._started = False
        self._in_step = False
        self._text_id: str | None = None
        self._texts = 0
        self._tool_names: dict[str, str] = {}  # calls started and not yet answered

    def encode(self, event: dict[str, Any]) -> list[bytes]:
        """The parts for one event (none for those the stream does not show)."""
        parts: list[dict[str, Any]] = []
        if not self._started:
            self._started = True
            parts.append({"type": "start", "messageId": self.job_id})
            self._step(parts)
        if "token" in event:
            self._step(parts)
            if self._text_id is None:
                self._texts += 1
                self._text_id = f"{self.job_id}-t{self._texts}"
                parts.append({"type": "text-start", "id": self._text_id})
            parts.append({"type": "text-delta", "id": self._text_id, "delta": event["token"]})
        elif "tool_call" in event:
            self._step(parts)
            self._end_text(parts)
            call = event["tool_call"]
            self._tool_names[call["id"]] = call["name"]
            parts.append(
                {
                    "type": "tool-input-start",
                    "toolCallId": call["id"],
                    "toolName": call["name"],
                    **SERVER_TOOL,
                }
            )
        elif "tools_called" in event:
            self._step(parts)
            self._end_text(parts)
            for call in event["tools_called"]:
                parts += self._tool_result(call)
            self._end_step(parts)
        elif "error" in event:
            self._end_text(parts)
            self._settle(parts, event["error"])
            self._end_step(parts)
            parts.append({"type": "error", "errorText": event["error"]})
        elif event.get("lifecycle") == "done":
            self._end_text(parts)
            self._settle(parts, "the answer ended without this tool call's result")
            self._end_step(parts)
            finish: dict[str, Any] = {"type": "finish"}
            reason = event.get("finish_reason")
            if reason is not None:
                finish["finishReason"] = FINISH_REASONS.get(reason, "other")
            parts.append(finish)
        out = [b"data: " + orjson.dumps(part) + b"\n\n" for part in parts]
        if "error" in event or event.get("lifecycle") == "done":
            out.append(DONE)
        return out

    def _tool_result(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        call_id, name = call["id"], call["name"]
        arguments = call.get("arguments")
        common = {"toolCallId": call_id, **SERVER_TOOL}
        started = self._tool_names.pop(call_id, None) is not None  # answered: settled
        parts = [] if started else [{"type": "tool-input-start", "toolName": name, **common}]
        parts.append(
            {"type": "tool-input-available", "toolName": name, "input": arguments, **common}
        )
        # An ``error: ...`` output too: the model read it and answered on.
        parts.append({"type": "tool-output-available", "output": call.get("output"), **common})
        return parts

    def _settle(self, parts: list[dict[str, Any]], error_text: str) -> None:
        """Calls started and never answered (an error, or an agent that forgot them) end
        as errors: a part left streaming its input would never settle in the client."""
        for call_id in self._tool_names:
            unanswered = {"toolCallId": call_id, "errorText": error_text, **SERVER_TOOL}
            parts.append({"type": "tool-output-error", **unanswered})
        self._tool_names.clear()

    def _step(self, parts: list[dict[str, Any]]) -> None:
        if not self._in_step:
            self._in_step = True
            parts.append({"type": "start-step"})

    def _end_step(self, parts: list[dict[str, Any]]) -> None:
        if self._in_step:
            self._in_step = False
            parts.append({"type": "finish-step"})

    def _end_text(self, parts: list[dict[str, Any]]) -> None:
        if self._text_id is not None:
            parts.append({"type": "text-end", "id": self._text_id})
            self._text_id = None
