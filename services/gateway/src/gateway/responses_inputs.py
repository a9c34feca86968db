"""Reading a ``POST /v1/responses`` body: its input items become the job's conversation (in
Chat Completions' shape, which every OpenAI-compatible server takes), its function tools
and parameters theirs; what the response object must echo is kept beside them.
"""

from __future__ import annotations

import re
from typing import Any

from shared.roles import Roles

from .openai_inputs import (
    RESPONSE_FORMATS,
    Conversation,
    InvalidField,
    check_json_schema,
    check_size,
    metadata_of,
    params_of,
    refuse_present,
    role_of,
    tools_of,
)

RESPONSE_ID = re.compile(r"resp_([0-9a-f]{32})")
ITEM_ID = re.compile(r"(?:msg|fc)_([0-9a-f]{32})_[0-9]{1,6}")  # a response's output item
_TEXT_PARTS = ("input_text", "output_text", "text")  # tuples: `in` with any JSON value
_MESSAGE_ROLES = ("assistant", "developer", "system", "user")
_LOGPROBS = "message.output_text.logprobs"
_UNAVAILABLE = {
    "prompt": "stored prompts are not available here: send instructions and input",
    "conversation": "stored conversations are not available here: use previous_response_id",
}


def response_request(
    body: dict[str, Any],
    roles: Roles,
    upstream_model: str,
    max_chars: int,
    earlier: list[dict[str, Any]],
) -> tuple[Conversation, dict[str, Any]]:
    """The conversation (``earlier`` turns first: the previous response's) and what the
    response object echoes."""
    role = role_of(body.get("model"), roles, upstream_model)
    refuse_present(body, _UNAVAILABLE)
    for name in ("background", "stream"):
        if body.get(name) is not None and not isinstance(body[name], bool):  # null: the default
            raise InvalidField(name, "must be true or false")
    if body.get("top_logprobs") or _LOGPROBS in _included(body.get("include")):
        raise InvalidField(
            "top_logprobs" if body.get("top_logprobs") else "include",
            "log probabilities are not available here",
        )
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidField("instructions", "must be a string")
    turns = [*earlier, *_items(body.get("input"))]
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + turns
    check_size(messages, max_chars, "input")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidField("tools", "must be a list of function tools")
    chat_tools = tools_of([_chat_tool(t, i) for i, t in enumerate(tools or [])])
    text_format = _text_format(body.get("text"))
    params = _params(body, text_format)
    echoed = {
        "model": body["model"],
        "instructions": instructions,
        "background": body.get("background") is True,
        "previous_response_id": body.get("previous_response_id"),
        "tools": list(tools or []),
        "tool_choice": "auto" if body.get("tool_choice") is None else body["tool_choice"],
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": metadata_of(body.get("metadata")),
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "text": {"format": text_format},
    }
    return Conversation(role, messages, chat_tools, params), echoed


def _items(value: object) -> list[dict[str, Any]]:
    """Input items as chat messages: messages, and function calls with their outputs."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidField("input", "required: a string or a non-empty list of items")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidField(where, "must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in _MESSAGE_ROLES:
                raise InvalidField(
                    f"{where}.role", f"must be one of {', '.join(sorted(_MESSAGE_ROLES))}"
                )
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append(
                {"role": role, "content": _text(item.get("content"), f"{where}.content")}
            )
        elif kind == "function_call":
            call = _call(item, where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant message
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not isinstance(output, str):
                raise InvalidField(
                    where, "a function_call_output needs a call_id and an output string"
                )
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        else:
            raise InvalidField(
                f"{where}.type",
                "only message, function_call and function_call_output items are supported",
            )
    return messages


def _text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidField(where, "must be a string or a list of text parts")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            raise InvalidField(f"{where}[{i}]", "only text parts are supported")
        if not isinstance(part.get("text"), str):
            raise InvalidField(f"{where}[{i}].text", "must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _call(item: dict[str, Any], where: str) -> dict[str, Any]:
    fields = [item.get(k) for k in ("call_id", "name", "arguments")]
    if not all(isinstance(f, str) for f in fields):
        raise InvalidField(where, "a function_call needs a call_id, a name and arguments")
    call_id, name, arguments = fields
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _chat_tool(tool: object, index: int) -> dict[str, Any]:
    """A Responses function tool (flat) as Chat Completions' (nested under ``function``)."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise InvalidField(f"tools[{index}]", "only function tools are supported")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    if function.get("strict") is None:
        function.pop("strict", None)
    return {"type": "function", "function": function}


def _included(include: object) -> list[str]:
    if include is None:
        return []
    if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
        raise InvalidField("include", "must be a list of strings")
    return include


def _text_format(text: object) -> dict[str, Any]:
    """The requested output format (``text.format``): text, json_object or json_schema."""
    if text is None:
        return {"type": "text"}
    text_format = text.get("format") if isinstance(text, dict) else None
    if text_format is None and isinstance(text, dict):
        return {"type": "text"}
    if not isinstance(text_format, dict) or text_format.get("type") not in RESPONSE_FORMATS:
        formats = ", ".join(RESPONSE_FORMATS)
        raise InvalidField("text.format", f"its type must be one of {formats}")
    if text_format["type"] == "json_schema":
        check_json_schema(text_format, "text.format", schema_required=True)
    return text_format


def _params(body: dict[str, Any], text_format: dict[str, Any]) -> dict[str, Any]:
    chat_like: dict[str, Any] = {
        k: body[k]
        for k in ("temperature", "top_p", "parallel_tool_calls")
        if body.get(k) is not None
    }
    if body.get("max_output_tokens") is not None:
        chat_like["max_tokens"] = body["max_output_tokens"]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        chat_like["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        chat_like["tool_choice"] = choice
    if text_format["type"] == "json_schema":
        schema = {k: text_format[k] for k in ("name", "schema", "strict") if k in text_format}
        chat_like["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif text_format["type"] == "json_object":
        chat_like["response_format"] = {"type": "json_object"}
    try:
        return params_of(chat_like)
    except InvalidField as exc:
        if exc.param == "max_tokens":
            raise InvalidField(
                "max_output_tokens", "must be a whole number of at least 1"
            ) from None
        raise
