"""A job's events as the Responses API's: the ``response`` object as it stands, and its
stream of events numbered 0, 1, 2, ...

The encoding is a pure function of the job's events in order, so every reader, on every
gateway, joining at any time, numbers them alike: a reader resuming with
``starting_after=N`` re-encodes the job from its start and skips what it had. Nothing here
depends on the reader's clock: ``created_at`` is the time of the job's first entry.
"""

from __future__ import annotations

from typing import Any

from shared import events as ev

CANCELLED = {ev.CANCELLED, ev.CLIENT_GONE}


class ResponseEvents:
    def __init__(self, job_id: str, echoed: dict[str, Any], created_at: float) -> None:
        self.id = f"resp_{job_id}"
        self.job_id = job_id
        self.echoed = echoed
        self.created_at = int(created_at)  # OpenAI's are whole seconds; typed clients insist
        self.sequence = 0
        self.status = "queued"
        self.output: list[dict[str, Any]] = []
        self.text: list[str] | None = None  # the message being written, if one is open
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, str] | None = None
        self.incomplete: dict[str, str] | None = None

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The Responses events of one job event, numbered."""
        out: list[dict[str, Any]] = []
        lifecycle = event.get("lifecycle")
        if lifecycle == "queued":
            out += [self._with_response("response.created"), self._with_response("response.queued")]
        elif lifecycle == "started":
            self.status = "in_progress"
            out.append(self._with_response("response.in_progress"))
        elif "token" in event:
            out += self._open_message()
            assert self.text is not None
            self.text.append(event["token"])
            out.append(
                self._item_event(
                    "response.output_text.delta", content_index=0, delta=event["token"], logprobs=[]
                )
            )
        elif "client_tool_calls" in event:
            out += self._close_message("completed")
            for call in event["client_tool_calls"]:
                out += self._function_call(call)
        elif lifecycle == "done":
            cut = event.get("finish_reason") == "length"
            out += self._close_message("incomplete" if cut else "completed")
            self.usage = _usage(event.get("usage"))
            if cut:
                self.status = "incomplete"
                self.incomplete = {"reason": "max_output_tokens"}
                out.append(self._with_response("response.incomplete"))
            else:
                self.status = "completed"
                out.append(self._with_response("response.completed"))
        elif "error" in event:
            out += self._close_message("incomplete")
            cancelled = event["error"] in CANCELLED
            self.status = "cancelled" if cancelled else "failed"
            self.error = {
                "code": "cancelled" if cancelled else "server_error",
                "message": event["error"],
            }
            out.append(self._with_response("response.failed"))
        return [self._numbered(e) for e in out]

    def response(self) -> dict[str, Any]:
        """The ``response`` object as it stands."""
        echoed = {k: v for k, v in self.echoed.items()}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "output": [
                *self.output,
                *([self._message("in_progress")] if self.text is not None else []),
            ],
            "usage": self.usage,
            "text": {"format": {"type": "text"}},
            "store": True,
            **echoed,
        }

    def _numbered(self, event: dict[str, Any]) -> dict[str, Any]:
        event["sequence_number"] = self.sequence
        self.sequence += 1
        return event

    def _with_response(self, kind: str) -> dict[str, Any]:
        return {"type": kind, "response": self.response()}

    def _item_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": kind,
            "item_id": self._message_id(),
            "output_index": len(self.output),
            **fields,
        }

    def _message_id(self) -> str:
        return f"msg_{self.job_id}_{len(self.output)}"

    def _message(self, status: str) -> dict[str, Any]:
        text = "".join(self.text or [])
        return {
            "id": self._message_id(),
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [_part(text)] if status != "in_progress" or text else [],
        }

    def _open_message(self) -> list[dict[str, Any]]:
        if self.text is not None:
            return []
        self.text = []
        item = self._message("in_progress")
        return [
            {"type": "response.output_item.added", "output_index": len(self.output), "item": item},
            self._item_event("response.content_part.added", content_index=0, part=_part("")),
        ]

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        """The open message's last events; ``status``: ``incomplete`` if the answer was cut
        short (the token limit, an error)."""
        if self.text is None:
            return []
        text = "".join(self.text)
        item = self._message(status)
        out = [
            self._item_event("response.output_text.done", content_index=0, text=text, logprobs=[]),
            self._item_event("response.content_part.done", content_index=0, part=_part(text)),
            {"type": "response.output_item.done", "output_index": len(self.output), "item": item},
        ]
        self.output.append(item)
        self.text = None
        return out

    def _function_call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        index = len(self.output)
        item = {
            "id": f"fc_{self.job_id}_{index}",
            "type": "function_call",
            "status": "in_progress",
            "call_id": call["id"],
            "name": call["name"],
            "arguments": "",
        }
        done = {**item, "status": "completed", "arguments": call["arguments"]}
        self.output.append(done)
        where = {"item_id": item["id"], "output_index": index}
        return [
            {"type": "response.output_item.added", "output_index": index, "item": item},
            {"type": "response.function_call_arguments.delta", **where, "delta": call["arguments"]},
            {
                "type": "response.function_call_arguments.done",
                **where,
                "arguments": call["arguments"],
            },
            {"type": "response.output_item.done", "output_index": index, "item": done},
        ]


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(usage: dict[str, int] | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


def conversation_after(
    messages: list[dict[str, Any]], echoed: dict[str, Any], output: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """A finished response's conversation, to continue it (``previous_response_id``): its
    turns without its instructions (they do not carry over), then its output."""
    turns = messages[1:] if echoed.get("instructions") else messages
    text = "".join(
        part["text"] for item in output if item["type"] == "message" for part in item["content"]
    )
    calls = [
        {
            "id": i["call_id"],
            "type": "function",
            "function": {"name": i["name"], "arguments": i["arguments"]},
        }
        for i in output
        if i["type"] == "function_call"
    ]
    answer: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        answer["tool_calls"] = calls
    return [*turns, answer]
