"""``POST /v1/chat/completions`` and ``GET /v1/models``: OpenAI's Chat Completions over
Streamgate's jobs.

A chat completion is a job like any other (queued, run by a worker, its events in the one
log); only its reader differs: the relay's frames, decoded here, become
``chat.completion.chunk`` events (streamed) or one ``chat.completion`` (not). The native
dialect's relay is untouched: it never decodes an event. A completion is a ``GET /chat``
kind of job: a client that goes away has it cancelled after ``DISCONNECT_GRACE_S``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .chat import event_stream
from .errors import error_response
from .inputs import json_body, max_request_bytes
from .job_events import encoded, relayed, unless_client_leaves
from .jobs import enqueue_request
from .openai_inputs import InvalidField, chat_completion, role_of
from .state import State


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: one model per role, the default role first."""
    state: State = request.app.state.sg
    state.access.identify(request)
    roles = state.roles
    names = sorted(roles.roles, key=lambda name: name != roles.default)
    return JSONResponse({"object": "list", "data": [_model(n) for n in names]})


async def retrieve_model(request: Request) -> Response:
    """``GET /v1/models/{model}``: a role by its name (or the upstream model's, for the
    default role's), as OpenAI's SDKs ``models.retrieve`` it."""
    state: State = request.app.state.sg
    state.access.identify(request)
    model = request.path_params["model"]
    role_of(model, state.roles, state.settings.openai_model)
    return JSONResponse(_model(model))


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "streamgate"}


async def chat_completions(request: Request) -> Response:
    state: State = request.app.state.sg
    settings = state.settings
    identity = state.access.identify(request)
    body = await json_body(request, limit=max_request_bytes(settings.max_prompt_chars))
    conversation = chat_completion(
        body, state.roles, settings.openai_model, settings.max_prompt_chars
    )
    stream = body.get("stream")
    if stream is None:  # as OpenAI's: null is the default
        stream = False
    if not isinstance(stream, bool):
        raise InvalidField("stream", "must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidField("stream_options", "must be an object")
    release = state.access.take_stream_slot(request, identity)
    try:
        async with state.access.count_chat(request, identity):
            job_id = await enqueue_request(
                state,
                conversation.job_request(),
                "get",
                identity,
                request.headers.get("traceparent"),
            )
    except BaseException:
        release()
        raise
    chunks = ChatChunks(job_id, str(body["model"]), options.get("include_usage") is True)
    if stream:
        return event_stream(state, encoded(state, job_id, chunks.encode, new_chat=True), release)
    try:
        return await _until_done(request, state, job_id, chunks)
    finally:
        release()


async def _until_done(request: Request, state: State, job_id: str, chunks: ChatChunks) -> Response:
    """The whole answer, once the job ends; a client that leaves first is a reader gone."""

    async def collect() -> Response:
        async for entry in relayed(state, job_id, new_chat=True):
            if entry is not None:
                chunks.add(entry[1])
        if chunks.error is not None:
            return error_response(500, chunks.error, request=request)
        return JSONResponse(chunks.completion())

    return await unless_client_leaves(request, collect())


class ChatChunks:
    """One job's events as a chat completion: streamed chunks, or the whole at the end."""

    def __init__(self, job_id: str, model: str, include_usage: bool) -> None:
        self.id = f"chatcmpl-{job_id}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.started = False
        self.text: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.finish_reason = "stop"
        self.usage: dict[str, int] | None = None
        self.error: str | None = None

    def encode(self, event: dict[str, Any]) -> list[bytes]:
        """The SSE events of one job event (none for those a client of this API never sees:
        the lifecycle, Streamgate's own tools)."""
        out = []
        if not self.started:
            self.started = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        if "token" in event:
            out.append(self._chunk({"content": event["token"]}))
        elif "client_tool_calls" in event:
            for index, call in enumerate(event["client_tool_calls"]):
                out.append(self._chunk({"tool_calls": [_tool_call(call, index)]}))
        elif event.get("lifecycle") == "done":
            out.append(self._chunk({}, event.get("finish_reason") or "stop"))
            if self.include_usage:
                out.append(_data({**self._head(), "choices": [], "usage": event.get("usage")}))
            out.append(b"data: [DONE]\n\n")
        elif "error" in event:
            error = {"message": event["error"], "type": "server_error", "code": None}
            out.append(_data({"error": error}))
        return out

    def add(self, event: dict[str, Any]) -> None:
        """Take one event into the whole answer."""
        if "token" in event:
            self.text.append(event["token"])
        elif "client_tool_calls" in event:
            self.calls += [_tool_call(c) for c in event["client_tool_calls"]]
        elif event.get("lifecycle") == "done":
            self.finish_reason = event.get("finish_reason") or "stop"
            self.usage = event.get("usage")
        elif "error" in event:
            self.error = event["error"]

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) or None}
        if self.calls:
            message["tool_calls"] = self.calls
        choice = {"index": 0, "message": message, "finish_reason": self.finish_reason}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage,
        }

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return _data({**self._head(), "choices": [choice]})


def _tool_call(call: dict[str, Any], index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": call["id"],
        "type": "function",
        "function": {"name": call["name"], "arguments": call["arguments"]},
    }
    if index is not None:
        out["index"] = index
    return out


def _data(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"
