"""Reading the body the AI SDK's ``DefaultChatTransport`` sends (``id``, ``messages`` as UI
messages, ``trigger``, ``messageId``) into a job's request.

UI messages carry ``parts``; their text parts become the message's content. Other parts of
an assistant message (Streamgate's own tool calls, steps) are what the answer showed, not
what the model needs again, so they are left out; a user message with anything but text
(files) is refused, as the OpenAI API refuses non-text content. ``regenerate-message``
answers the conversation again without its last answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from shared.roles import Roles

from .errors import BadRequest
from .openai_inputs import check_size

CHAT_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.:-]{0,127}")
TRIGGERS = ("submit-message", "regenerate-message")
_ROLES = ("system", "user", "assistant")


@dataclass
class ChatTurn:
    chat_id: str
    role: str  # the Streamgate role (``role`` in the transport's body), else the default
    messages: list[dict[str, Any]]

    def job_request(self) -> dict[str, Any]:
        return {"role": self.role, "messages": self.messages}


def chat_id_of(value: object) -> str:
    if not isinstance(value, str) or not CHAT_ID.fullmatch(value) or value.strip(".") == "":
        raise BadRequest(
            "id: the chat's id is 1 to 128 of A-Z a-z 0-9 _ - . : (not starting with . or :)"
        )
    return value


def chat_turn(body: dict[str, Any], roles: Roles, max_chars: int) -> ChatTurn:
    chat_id = chat_id_of(body.get("id"))
    trigger = body.get("trigger", "submit-message")
    if trigger not in TRIGGERS:
        raise BadRequest(f"trigger: must be {' or '.join(TRIGGERS)}")
    role = body.get("role")
    if role is not None and (not isinstance(role, str) or roles.get(role) is None):
        raise BadRequest(f"role: unknown role {role!r}; the roles are: {', '.join(roles.roles)}")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: required, a non-empty list of UI messages")
    messages = [_message(m, f"messages[{i}]") for i, m in enumerate(raw)]
    if trigger == "regenerate-message":
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
    messages = [m for m in messages if m["content"] or m["role"] == "user"]
    if not messages or messages[-1]["role"] != "user":
        raise BadRequest("messages: the last message must be the user's")
    if not messages[-1]["content"].strip():  # as /chat refuses a blank prompt
        raise BadRequest("messages: the last user message has no text")
    check_size(messages, max_chars, "messages")
    return ChatTurn(chat_id, role or roles.default, messages)


def _message(message: object, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise BadRequest(f"{where}: must be a UI message (an object with role and parts)")
    role = message.get("role")
    if role not in _ROLES:
        raise BadRequest(f"{where}.role: must be one of {', '.join(_ROLES)}")
    parts = message.get("parts")
    if not isinstance(parts, list):
        raise BadRequest(f"{where}.parts: must be a list")
    texts = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}.parts[{i}].text: must be a string")
            texts.append(part["text"])
        elif role == "user" and kind != "step-start":
            raise BadRequest(f"{where}.parts[{i}]: only text parts are supported from the user")
    return {"role": role, "content": "".join(texts)}
