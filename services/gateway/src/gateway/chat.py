"""The chat endpoints: start a job, read its events, cancel it, list the roles and tools."""

from __future__ import annotations

import fnmatch
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared.cursors import START, Cursor, is_job_id
from shared.event_log import FINAL

from .errors import BadRequest, NotFound, Unavailable, allowed_methods, method_not_allowed
from .event_stream import EventStream
from .inputs import (
    ChatRequest,
    chat_request,
    cursor_of,
    json_body,
    max_request_bytes,
    query_params,
)
from .jobs import cancel_job, check_session, enqueue
from .resume_trace import traced
from .state import State

SSE_HEADERS = {"Cache-Control": "no-cache, no-store", "X-Accel-Buffering": "no"}


async def chat_get(request: Request) -> Response:
    """``GET /chat?prompt=``: start a job and stream it; with a cursor, resume instead."""
    state: State = request.app.state.sg
    identity = state.access.identify(request)
    params = query_params(request)
    cursor = cursor_of(request, params)
    if cursor is not None:
        return await _resume(request, cursor, identity)
    chat = _checked(state, chat_request(dict(params), state.settings.max_prompt_chars))
    if request.method == "HEAD":
        # What a GET would answer before its stream, without enqueueing anything.
        await check_session(state, chat, identity)
        return _headers_only()
    release = state.access.take_stream_slot(request, identity)
    try:
        async with state.access.count_chat(request, identity):
            job_id = await enqueue(state, chat, "get", identity, request.headers.get("traceparent"))
    except BaseException:
        release()
        raise
    return _stream(request, job_id, START, release, new_chat=True)


async def chat_post(request: Request) -> Response:
    """``POST /chat``: start a job that runs to its end whether or not anyone reads it."""
    state: State = request.app.state.sg
    identity = state.access.identify(request)
    # Up to 12 bytes a character: JSON may escape one as two \uXXXX surrogates.
    body = await json_body(request, limit=max_request_bytes(state.settings.max_prompt_chars))
    chat = _checked(state, chat_request(body, state.settings.max_prompt_chars))
    async with state.access.count_chat(request, identity):
        job_id = await enqueue(state, chat, "post", identity, request.headers.get("traceparent"))
    return JSONResponse({"job_id": job_id, "events_url": f"/chat/{job_id}/events"}, status_code=202)


async def chat_events(request: Request) -> Response:
    """``GET /chat/<job_id>/events``: the job's events from the start or after a cursor."""
    identity = request.app.state.sg.access.identify(request)
    job_id = _job_id(request)
    cursor = cursor_of(request, query_params(request))
    if cursor is not None and cursor.job_id != job_id:
        raise BadRequest("the cursor belongs to another job")
    return await _resume(request, cursor or Cursor(job_id, START), identity)


async def chat_cancel(request: Request) -> Response:
    """``DELETE /chat/<job_id>``: end the job with ``cancelled``; its worker stops within 1 s."""
    state: State = request.app.state.sg
    identity = state.access.identify(request)
    job_id = _job_id(request)
    await _find(state, job_id, identity)
    await cancel_job(state, job_id)
    return Response(status_code=204)


async def list_roles(request: Request) -> Response:
    """``GET /roles``: the roles a chat may ask for, default first."""
    state: State = request.app.state.sg
    state.access.identify(request)
    roles = state.roles
    ordered = sorted(roles.roles.values(), key=lambda r: r.name != roles.default)
    return JSONResponse(
        [
            {"name": r.name, "description": r.description}
            | ({"tools": list(r.tools)} if r.tools is not None else {})
            for r in ordered
        ]
    )


async def list_tools(request: Request) -> Response:
    """``GET /tools`` (``?role=NAME``): the tools a chat in that role (the default one) may
    use, as the workers published them (a worker owns the MCP connections)."""
    state: State = request.app.state.sg
    state.access.identify(request)
    name = query_params(request).get("role")
    role = state.roles.get(name)
    if role is None:
        known = ", ".join(state.roles.roles)
        raise BadRequest(f"unknown role {name!r}; the roles are: {known} (GET /roles)")
    tools = await state.shards.tools()
    if tools is None:
        raise Unavailable("no worker has listed its tools: is a worker running? (retry)")
    offered = [
        tool
        for tool in tools
        if role.tools is None or any(fnmatch.fnmatchcase(tool["name"], p) for p in role.tools)
    ]
    return JSONResponse(offered)


async def not_a_job(request: Request) -> Response:
    """Any other path or method under /chat/: a job URL asked with a method it does not
    serve is a 405 (with ``Allow``), anything else is never a job."""
    if allowed_methods(request):
        raise method_not_allowed()
    raise NotFound("no such job URL: use /chat/<job_id>/events or /chat/<job_id>")


def _checked(state: State, chat: ChatRequest) -> ChatRequest:
    if chat.role is not None and state.roles.get(chat.role) is None:
        known = ", ".join(state.roles.roles)
        raise BadRequest(f"unknown role {chat.role!r}; the roles are: {known} (GET /roles)")
    return chat


def _job_id(request: Request) -> str:
    job_id: str = request.path_params["job_id"]
    if not is_job_id(job_id):
        # No such job can exist, so the answer is the one for an unknown job.
        raise NotFound(f"no job {job_id[:64]!r}: job ids are 32 lowercase hex digits")
    return job_id


async def _find(state: State, job_id: str, identity: str) -> None:
    """404 unless the job exists and belongs to this caller's key."""
    if await state.shards.of_job(job_id).log.key_of(job_id) != identity:
        raise NotFound(f"no job {job_id}: unknown, or its events have expired")


async def _resume(request: Request, cursor: Cursor, identity: str) -> Response:
    state: State = request.app.state.sg
    await _find(state, cursor.job_id, identity)
    if cursor.made_up:  # a final event for its reader, though made up by a gateway
        return Response(status_code=204)
    if cursor.entry_id != START:
        log = state.shards.of_job(cursor.job_id).log
        entry = await log.entry(cursor.job_id, cursor.entry_id)
        if entry is None:
            raise BadRequest("the cursor does not point into this job's events")
        if FINAL in entry[1]:
            return Response(status_code=204)  # stops a browser's EventSource for good
    if request.method == "HEAD":
        return _headers_only()
    release = state.access.take_stream_slot(request, identity)
    return _stream(request, cursor.job_id, cursor.entry_id, release)  # a resume: traced


def _headers_only() -> Response:
    return Response(media_type="text/event-stream", headers=SSE_HEADERS)


def _stream(
    request: Request,
    job_id: str,
    after: str,
    release: Callable[[], None],
    new_chat: bool = False,
) -> Response:
    state: State = request.app.state.sg

    async def frames() -> AsyncIterator[bytes]:
        # Subscribed here, not in the handler: a response that never starts holds nothing.
        relay = state.shards.of_job(job_id).relay
        reader = relay.subscribe(job_id, after, new_chat)
        try:
            async for chunk in reader.frames_until_end(state.settings.ping_interval_s):
                yield chunk
        finally:
            relay.unsubscribe(reader)

    if new_chat:
        return event_stream(state, frames(), release)
    resumed = traced(state, job_id, frames(), request.headers.get("traceparent"))
    return event_stream(state, resumed, release)


def event_stream(
    state: State,
    frames: AsyncIterator[bytes],
    release: Callable[[], None],
    headers: dict[str, str] | None = None,
) -> EventStream:
    """The SSE response of every stream, in any dialect: the stream slot ``release`` gives
    back after the last byte."""
    return EventStream(
        frames,
        headers={**SSE_HEADERS, **(headers or {})},
        send_timeout_s=state.settings.send_timeout_s,
        release=release,
        shutdown_event=state.shards.shutting_down,
    )
