"""Reading what a client asked for: the query string, the JSON body, the cursor.

Starlette decodes queries leniently (bad UTF-8 becomes U+FFFD); a chat must not run on a
prompt the user never wrote, so the query is parsed again here, strictly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

import orjson
from starlette.requests import ClientDisconnect, Request

from shared.cursors import Cursor, parse_cursor

from .errors import ApiError, BadRequest, PromptTooLong

_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_RAW_NON_ASCII = re.compile(rb"[\x80-\xff]")
_SESSION = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ROLE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class ChatRequest:
    prompt: str
    session: str | None = None
    role: str | None = None


def max_request_bytes(max_prompt_chars: int) -> int:
    """The most bytes a request target or JSON body needs for a prompt within the limit: 12
    a character (4 UTF-8 bytes, percent-encoded or JSON-escaped), and 4 KB besides."""
    return 12 * max_prompt_chars + 4096


def query_params(request: Request) -> dict[str, str]:
    raw: bytes = request.scope.get("query_string", b"")
    if _BAD_PERCENT.search(raw):
        raise BadRequest("the query string has a malformed percent-escape (use %XX)")
    raw = _RAW_NON_ASCII.sub(lambda m: b"%%%02X" % m[0][0], raw)
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as exc:
        raise BadRequest("the query string is not valid UTF-8 once percent-decoded") from exc
    params: dict[str, str] = {}
    for name, value in pairs:
        params.setdefault(name, value)
    return params


def cursor_of(request: Request, params: dict[str, str]) -> Cursor | None:
    """The resume cursor from ``Last-Event-ID`` or ``last_event_id``; 400 if malformed."""
    header = request.headers.get("last-event-id", "").strip(" \t")  # a header's own blanks
    value, source = (
        (header, "Last-Event-ID") if header else (params.get("last_event_id"), "last_event_id")
    )
    if not value:
        return None
    cursor = parse_cursor(value)
    if cursor is None:
        raise BadRequest(f"{source} is not a cursor from this service")
    return cursor


def chat_request(fields: dict[str, object], max_prompt_chars: int) -> ChatRequest:
    prompt = fields.get("prompt")
    if prompt is None:
        raise BadRequest("missing prompt: pass ?prompt=... or a JSON body with a 'prompt'")
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    if not prompt.strip():
        raise BadRequest("prompt is empty")
    if len(prompt) > max_prompt_chars:
        raise PromptTooLong(
            f"prompt is {len(prompt)} characters; the limit is {max_prompt_chars}"
            " (MAX_PROMPT_CHARS)"
        )
    session = _optional(fields, "session", _SESSION, "1-64 letters, digits, '-' or '_'")
    role = _optional(fields, "role", _ROLE, "1-64 letters, digits, '.', '-' or '_'")
    return ChatRequest(prompt=prompt, session=session, role=role)


def _optional(
    fields: dict[str, object], name: str, pattern: re.Pattern[str], rule: str
) -> str | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise BadRequest(f"{name} must be {rule}")
    return value


async def json_body(request: Request, limit: int) -> dict[str, object]:
    size = 0
    chunks: list[bytes] = []
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge(f"the request body is over {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # The client's fault, not ours: a 400 for the metrics, though nobody reads it.
        raise BadRequest("the request body was cut off before its end") from None
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


class _BodyTooLarge(ApiError):
    status = 413
