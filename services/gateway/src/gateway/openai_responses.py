"""OpenAI's Responses API over Streamgate's jobs: create (foreground or ``background``,
streamed or not), retrieve (``stream=true&starting_after=N`` resumes), cancel.

A response is a job: ``resp_<job_id>``. Its events are numbered by ``response_events``
from the job's event log, so any gateway can serve any reader of it, from any point, for
``STREAM_RETENTION_S`` after its end. A background response runs to its end whether or not
anyone reads it (a ``POST /chat`` job); a foreground one is cancelled when its client has
been gone for ``DISCONNECT_GRACE_S`` (a ``GET /chat`` job).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .chat import SSE_HEADERS, event_stream
from .errors import BadRequest, NotFound, PromptTooLong, error_response
from .inputs import json_body, max_request_bytes, query_params
from .job_events import relayed, stored, unless_client_leaves
from .jobs import cancel_job, enqueue_request
from .openai_inputs import InvalidField
from .reader import PING
from .response_events import ResponseEvents, conversation_after
from .responses_inputs import ITEM_ID, RESPONSE_ID, response_request
from .resume_trace import traced
from .state import State


async def create_response(request: Request) -> Response:
    state: State = request.app.state.sg
    settings = state.settings
    identity = state.access.identify(request)
    body = await json_body(request, limit=max_request_bytes(settings.max_prompt_chars))
    earlier: list[dict[str, Any]] = []
    if body.get("previous_response_id") is not None:
        earlier = await _continued(state, body["previous_response_id"], identity)
    body["input"] = await _referenced(state, body.get("input"), identity)
    conversation, echoed = response_request(
        body, state.roles, settings.openai_model, settings.max_prompt_chars, earlier
    )
    background, stream = body.get("background") is True, body.get("stream") is True
    job_request = {**conversation.job_request(), "response": echoed}
    release = state.access.take_stream_slot(request, identity) if stream or not background else None
    try:
        async with state.access.count_chat(request, identity):
            job_id = await enqueue_request(
                state,
                job_request,
                "post" if background else "get",
                identity,
                request.headers.get("traceparent"),
            )
    except BaseException:
        if release is not None:
            release()
        raise
    if release is None:  # background, not streamed: the response as it was queued
        try:
            queued = await _as_stored(state, job_id, echoed, first_only=True)
        except RedisError:  # it is queued all the same: a 503 would have the client repeat it
            queued = ResponseEvents(job_id, echoed, time.time())
        return JSONResponse(queued.response())
    if stream:
        frames = _frames(state, job_id, echoed, -1, new_chat=True)
        return event_stream(state, frames, release)
    try:
        return await _until_done(request, state, job_id, echoed)
    finally:
        release()


async def retrieve_response(request: Request) -> Response:
    """``GET /v1/responses/{id}``: the response as it stands, or with ``stream=true`` its
    events after ``starting_after``, then on as they come."""
    state: State = request.app.state.sg
    identity = state.access.identify(request)
    params = query_params(request)  # strict, as /chat's: bad UTF-8 is a 400
    job_id, echoed = await _find(state, request.path_params["response_id"], identity)
    if params.get("stream", "false").lower() != "true":
        return JSONResponse((await _as_stored(state, job_id, echoed)).response())
    raw = params.get("starting_after", "-1")
    # "¹" is a digit to isdigit, and int() takes at most 4,300 digits
    if raw != "-1" and not (raw.isascii() and raw.isdigit() and len(raw) <= 20):
        raise InvalidField("starting_after", "must be a sequence number (0 or more)")
    if request.method == "HEAD":  # what a stream would answer, without one
        return Response(media_type="text/event-stream", headers=SSE_HEADERS)
    release = state.access.take_stream_slot(request, identity)
    frames = _frames(state, job_id, echoed, int(raw))
    resumed = traced(state, job_id, frames, request.headers.get("traceparent"))
    return event_stream(state, resumed, release)


async def cancel_response(request: Request) -> Response:
    """``POST /v1/responses/{id}/cancel``: as ``DELETE /chat/<job_id>``; the response as it
    ended (cancelled, or as it had already ended)."""
    state: State = request.app.state.sg
    identity = state.access.identify(request)
    job_id, echoed = await _find(state, request.path_params["response_id"], identity)
    await cancel_job(state, job_id)
    return JSONResponse((await _as_stored(state, job_id, echoed)).response())


async def _find(state: State, response_id: str, identity: str) -> tuple[str, dict[str, Any]]:
    """The job of a response this caller may see, and what its object echoes; else 404."""
    match = RESPONSE_ID.fullmatch(response_id)
    job_id = match.group(1) if match else None
    if job_id is not None:
        log = state.shards.of_job(job_id).log
        raw = await log.request_of(job_id)
        job = orjson.loads(raw) if raw is not None else {}
        if "response" in job and await log.key_of(job_id) == identity:
            return job_id, job["response"]
    raise NotFound(f"no response {response_id[:80]!r}: unknown, or its events have expired")


async def _continued(state: State, response_id: object, identity: str) -> list[dict[str, Any]]:
    """The conversation a ``previous_response_id`` ended with, to go on from."""
    if not isinstance(response_id, str):
        raise InvalidField("previous_response_id", "must be a response id (resp_...)")
    try:
        job_id, echoed = await _find(state, response_id, identity)
    except NotFound as exc:
        exc.param = "previous_response_id"
        raise
    previous = await _as_stored(state, job_id, echoed)
    if previous.status not in ("completed", "incomplete"):
        raise _NotFinished(
            f"previous_response_id: response {response_id} is {previous.status}; continue"
            " from one that has completed"
        )
    raw = await state.shards.of_job(job_id).log.request_of(job_id)
    messages = orjson.loads(raw or b"{}").get("messages", [])
    return conversation_after(messages, echoed, previous.output)


class _NotFinished(BadRequest):
    param = "previous_response_id"


# Responses one request's item_references may name (each is read whole): the AI SDK names
# one per earlier turn.
REFERENCED_MAX = 256


async def _referenced(state: State, items: object, identity: str) -> object:
    """``input`` with each ``item_reference`` (what an SDK sends for an output item of a
    stored response, as the AI SDK does by default) replaced by that item."""
    if not isinstance(items, list):
        return items
    outputs: dict[str, list[dict[str, Any]]] = {}  # per response: its output items
    limit = state.settings.max_prompt_chars
    # Refused as soon as the text named passes the limit (as check_size counts it), or what
    # was read to find it passes four times that: not after reading every response named.
    named = read = 0
    resolved: list[object] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("type") != "item_reference":
            resolved.append(item)
            continue
        reference = item.get("id")
        if not isinstance(reference, str):
            raise InvalidField(f"input[{i}].id", "an item_reference needs an item's id")
        match = ITEM_ID.fullmatch(reference)
        found = None
        if match is not None:
            response_id = f"resp_{match.group(1)}"
            if response_id not in outputs and len(outputs) == REFERENCED_MAX:
                raise InvalidField(
                    f"input[{i}].id",
                    f"items of at most {REFERENCED_MAX} responses: send the others' items whole",
                )
            if response_id not in outputs:
                try:
                    job_id, echoed = await _find(state, response_id, identity)
                    outputs[response_id] = (await _as_stored(state, job_id, echoed)).output
                except NotFound:
                    outputs[response_id] = []
                read += _text_chars(outputs[response_id])
            found = next((o for o in outputs[response_id] if o["id"] == reference), None)
            named += _content_chars(found)
            if named > limit or read > 4 * limit:
                raise PromptTooLong(
                    f"input[{i}]: the responses that item_references name hold more text than"
                    f" a conversation may ({limit} characters, MAX_PROMPT_CHARS)",
                    f"input[{i}].id",
                )
        if found is None:
            raise NotFound(
                f"input[{i}]: no item {str(reference)[:80]!r}: item_reference names an output"
                " item of a response of yours, kept for STREAM_RETENTION_S",
                f"input[{i}].id",
            )
        resolved.append(found)
    return resolved


def _content_chars(item: dict[str, Any] | None) -> int:
    """The characters of a message item's text, as check_size counts a message's."""
    content = item.get("content") if item is not None else None
    if not isinstance(content, list):
        return 0
    return sum(len(p.get("text") or "") for p in content if isinstance(p, dict))


def _text_chars(value: object) -> int:
    """The characters of every string in a JSON value."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    return 0


async def _as_stored(
    state: State, job_id: str, echoed: dict[str, Any], first_only: bool = False
) -> ResponseEvents:
    """The response as its stored events tell (``first_only``: as it was queued, whatever
    happened since), its ``created_at`` their first's time: the same for every reader."""
    encoder: ResponseEvents | None = None
    async for at, event in stored(state, job_id):
        encoder = encoder or ResponseEvents(job_id, echoed, at)
        encoder.feed(event)
        if first_only:
            break
    return encoder or ResponseEvents(job_id, echoed, time.time())


async def _frames(
    state: State,
    job_id: str,
    echoed: dict[str, Any],
    starting_after: int,
    new_chat: bool = False,
) -> AsyncIterator[bytes]:
    """The response's events after ``starting_after``, live."""
    encoder: ResponseEvents | None = None
    async for entry in relayed(state, job_id, new_chat):
        if entry is None:
            yield PING
            continue
        encoder = encoder or ResponseEvents(job_id, echoed, entry[0])
        events = encoder.feed(entry[1])
        out = [e for e in events if e["sequence_number"] > starting_after]
        if out:
            yield b"".join(
                b"event: %s\ndata: %s\n\n" % (e["type"].encode(), orjson.dumps(e)) for e in out
            )
        elif not events:  # an event Responses do not show: a ping, as in encoded()
            yield PING


async def _until_done(
    request: Request, state: State, job_id: str, echoed: dict[str, Any]
) -> Response:
    """A foreground response that is not streamed: the whole, once the job ends."""

    async def collect() -> Response:
        encoder: ResponseEvents | None = None
        async for entry in relayed(state, job_id, new_chat=True):
            if entry is not None:
                encoder = encoder or ResponseEvents(job_id, echoed, entry[0])
                encoder.feed(entry[1])
        answer = encoder or await _as_stored(state, job_id, echoed)
        if answer.status == "failed" and answer.error is not None:
            # As a completion's: no answer is an error, not a 200 clients read as one.
            return error_response(500, answer.error["message"], request=request)
        return JSONResponse(answer.response())

    return await unless_client_leaves(request, collect())
