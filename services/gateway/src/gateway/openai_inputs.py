"""Reading an OpenAI API request into a job's request: the conversation, the client's tools
and the sampling parameters, each checked, so a bad request is a 400 naming its field and
enqueues nothing.

OpenAI's API reference is the authority on every field. A field Streamgate does not use is
ignored, unless ignoring it would change the answer's meaning (``n`` > 1, log
probabilities, audio or other non-text output or content, the legacy ``functions``, web
search; in the Responses API a stored ``prompt`` or ``conversation``): that is a 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from shared.roles import Roles

from .errors import BadRequest, NotFound, PromptTooLong

ROLES = ("assistant", "developer", "system", "tool", "user")  # a tuple: `in` with any JSON value
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# Passed upstream as given once checked: each changes the answer, so none may be dropped.
_NUMBERS = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
_COUNTS = ("max_tokens", "max_completion_tokens")
_INT64 = 2**63


class InvalidField(BadRequest):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class Conversation:
    """What a job needs from an OpenAI request."""

    role: str  # the Streamgate role the model names
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def job_request(self) -> dict[str, Any]:
        request: dict[str, Any] = {"role": self.role, "messages": self.messages}
        if self.tools:
            request["tools"] = self.tools
        if self.params:
            request["params"] = self.params
        return request


def role_of(model: object, roles: Roles, upstream_model: str) -> str:
    """The role a ``model`` names: a role's name, or the upstream model's for the default."""
    if not isinstance(model, str) or not model:
        raise InvalidField("model", "required: a role's name (GET /v1/models lists them)")
    if model in roles.roles:
        return model
    if model == upstream_model:
        return roles.default
    raise ModelNotFound(
        f"the model {model!r} does not exist; the models are the roles: "
        f"{', '.join(roles.roles)} (GET /v1/models)"
    )


class ModelNotFound(NotFound):
    code = "model_not_found"
    param = "model"


def chat_completion(
    body: dict[str, Any], roles: Roles, upstream_model: str, max_chars: int
) -> Conversation:
    """The conversation of a ``POST /v1/chat/completions`` body."""
    role = role_of(body.get("model"), roles, upstream_model)
    if body.get("n") not in (None, 1):
        raise InvalidField("n", "only one choice is produced: leave n out or set it to 1")
    for name in ("logprobs", "top_logprobs"):
        if body.get(name):
            raise InvalidField(name, "log probabilities are not available here")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise InvalidField("modalities", 'only text is produced: leave it out or send ["text"]')
    if body.get("functions"):
        raise InvalidField("functions", "the legacy functions are not supported: send tools")
    if body.get("function_call") not in (None, "none", "auto"):
        raise InvalidField("function_call", "not supported: send tools and tool_choice")
    refuse_present(body, CHAT_UNAVAILABLE)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidField("messages", "required: a non-empty list of messages")
    checked = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    check_size(checked, max_chars, "messages")
    if body.get("tools") == []:  # as OpenAI: "only those tools" of none would mean no tools
        raise InvalidField("tools", "an empty list: leave tools out, or list at least one")
    return Conversation(role, checked, tools_of(body.get("tools")), params_of(body))


CHAT_UNAVAILABLE = {
    "audio": "audio output is not available here",
    "web_search_options": "web search is not available here",
}


def refuse_present(body: dict[str, Any], unavailable: dict[str, str]) -> None:
    """A 400 for the first field of ``unavailable`` the body sets: the answer without it
    would mean something else."""
    for name, why in unavailable.items():
        if body.get(name) is not None:
            raise InvalidField(name, why)


def check_size(messages: list[dict[str, Any]], max_chars: int, param: str) -> None:
    """MAX_PROMPT_CHARS bounds all the text of a conversation (413 past it); ``param`` names
    the request's field that holds it."""
    chars = sum(len(m.get("content") or "") for m in messages)
    if chars > max_chars:
        raise PromptTooLong(
            f"the messages hold {chars} characters of text; the limit is {max_chars}"
            " (MAX_PROMPT_CHARS)",
            param,
        )


def _message(message: object, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise InvalidField(where, "must be an object with a role and content")
    role = message.get("role")
    if role not in ROLES:
        raise InvalidField(f"{where}.role", f"must be one of {', '.join(sorted(ROLES))}")
    content = _text(message.get("content"), f"{where}.content")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidField(f"{where}.tool_call_id", "required on a tool message")
        out["tool_call_id"] = call_id
    if role == "assistant" and message.get("tool_calls") is not None:
        out["tool_calls"] = _assistant_calls(message["tool_calls"], f"{where}.tool_calls")
    elif content is None:
        raise InvalidField(f"{where}.content", "required")
    return out


def _text(content: object, where: str) -> str | None:
    """Text content, or text parts joined; other parts would be dropped, so are refused."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidField(where, "must be a string or a list of text parts")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise InvalidField(f"{where}[{i}]", "only text parts are supported")
        if not isinstance(part.get("text"), str):
            raise InvalidField(f"{where}[{i}].text", "must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _assistant_calls(calls: object, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise InvalidField(where, "must be a list")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(call.get("id"), str)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            raise InvalidField(f"{where}[{i}]", "needs an id and a function's name and arguments")
        out.append(
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": function["name"], "arguments": function["arguments"]},
            }
        )
    return out


def tools_of(tools: object) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidField("tools", "must be a list of function tools")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise InvalidField(f"tools[{i}]", "only function tools are supported")
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise InvalidField(f"tools[{i}].function.name", "must match ^[a-zA-Z0-9_-]{1,64}$")
        checked: dict[str, Any] = {"name": name}
        for key, kind in (("description", str), ("parameters", dict), ("strict", bool)):
            if key in function:
                if not isinstance(function[key], kind):
                    raise InvalidField(f"tools[{i}].function.{key}", f"must be a {kind.__name__}")
                checked[key] = function[key]
        out.append({"type": "function", "function": checked})
    return out or None


def params_of(body: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, (low, high) in _NUMBERS.items():
        value = body.get(name)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise InvalidField(name, f"must be a number from {low:g} to {high:g}")
        params[name] = value
    for name in _COUNTS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidField(name, "must be a whole number of at least 1")
        params[name] = value
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not -_INT64 <= seed < _INT64:
            raise InvalidField("seed", "must be a whole number (64-bit)")
        params["seed"] = seed
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise InvalidField("parallel_tool_calls", "must be true or false")
        params["parallel_tool_calls"] = parallel
    bias = body.get("logit_bias")
    if bias is not None:
        params["logit_bias"] = _logit_bias(bias)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise InvalidField("stop", "must be a string or a list of up to 4 strings")
        params["stop"] = stop
    choice = body.get("tool_choice")
    if choice is not None:
        function = choice.get("function") if isinstance(choice, dict) else None
        named = isinstance(function, dict) and isinstance(function.get("name"), str)
        if choice not in ("none", "auto", "required") and not named:
            raise InvalidField(
                "tool_choice", 'must be "none", "auto", "required" or a named function'
            )
        params["tool_choice"] = choice
    response_format = body.get("response_format")
    if response_format is not None:
        params["response_format"] = _response_format(response_format)
    return params


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _response_format(value: object) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        raise InvalidField(
            "response_format", f"its type must be one of {', '.join(RESPONSE_FORMATS)}"
        )
    if value["type"] == "json_schema":
        if not isinstance(value.get("json_schema"), dict):
            raise InvalidField("response_format.json_schema", "must be an object (name, schema)")
        check_json_schema(value["json_schema"], "response_format.json_schema")
    return value


def check_json_schema(value: dict[str, Any], where: str, schema_required: bool = False) -> None:
    """A structured output's format as OpenAI takes it (a bad one would fail upstream, a
    500 to the client, rather than a 400 here)."""
    name = value.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise InvalidField(f"{where}.name", "must match ^[a-zA-Z0-9_-]{1,64}$")
    schema = value.get("schema")
    if (schema is not None or schema_required) and not isinstance(schema, dict):
        raise InvalidField(f"{where}.schema", "must be a JSON Schema (an object)")
    for key, kind in (("description", str), ("strict", bool)):
        if value.get(key) is not None and not isinstance(value[key], kind):
            raise InvalidField(f"{where}.{key}", f"must be a {kind.__name__}")


def metadata_of(value: object) -> dict[str, str]:
    """A request's ``metadata``, as OpenAI takes it: up to 16 string pairs (keys up to 64
    characters, values up to 512), echoed in what it answers."""
    if value is None:
        return {}
    if (
        not isinstance(value, dict)
        or len(value) > 16
        or not all(isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items())
    ):
        raise InvalidField(
            "metadata",
            "must be an object of up to 16 strings (keys up to 64 characters, values up to 512)",
        )
    return value


def _logit_bias(bias: object) -> dict[str, int | float]:
    """Token ids (as strings) to a bias from -100 to 100, as OpenAI takes them."""
    if not isinstance(bias, dict) or not all(
        isinstance(token, str)
        and token.isascii()
        and token.isdigit()
        and not isinstance(value, bool)
        and isinstance(value, int | float)
        and -100 <= value <= 100
        for token, value in bias.items()
    ):
        raise InvalidField(
            "logit_bias", "must map token ids (strings of digits) to numbers from -100 to 100"
        )
    return bias
