"""The AI SDK's chat endpoints, for ``useChat`` with ``DefaultChatTransport``:

- ``POST /aisdk/chat``: start the chat's next answer (a job like any other, of the
  ``GET /chat`` kind: a client that leaves, as ``stop()`` does, has it cancelled after
  ``DISCONNECT_GRACE_S``; a chat's earlier answer still running is cancelled) and stream
  it as the UI message stream;
- ``GET /aisdk/chat/<chat id>/stream``: the chat's active answer, replayed from its start
  (what ``resume: true`` asks for on mount), on any gateway; 204 when none is active;
- ``DELETE /aisdk/chat/<chat id>/stream``: cancel the active answer at once.

Which job is a chat's active answer lives in Redis (``Keys.aisdk_chat``, in the shard the
chat's name hashes to), per API key, so any gateway resumes it and one key's chat ids never
reach another's answers.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from .aisdk_inputs import chat_id_of, chat_turn
from .chat import event_stream
from .inputs import json_body, max_request_bytes
from .job_events import encoded
from .jobs import cancel_job, enqueue_request
from .resume_trace import traced
from .shards import Shard
from .state import State
from .ui_message_stream import HEADERS, UIMessageParts

MAX_BODY_BYTES = 8 << 20


async def chat(request: Request) -> Response:
    state: State = request.app.state.sg
    settings = state.settings
    identity = state.access.identify(request)
    # useChat sends the whole conversation, earlier tool parts (inputs, outputs) included,
    # which are dropped here: room for them beside the text's bytes.
    limit = max(2 * max_request_bytes(settings.max_prompt_chars), MAX_BODY_BYTES)
    body = await json_body(request, limit=limit)
    turn = chat_turn(body, state.roles, settings.max_prompt_chars)
    release = state.access.take_stream_slot(request, identity)
    # The chat's answers run in the shard that keeps which one is active: no answer starts
    # where that cannot be written.
    home = _home(state, identity, turn.chat_id)
    try:
        async with state.access.count_chat(request, identity):
            traceparent = request.headers.get("traceparent")
            job_id = await enqueue_request(
                state, turn.job_request(), "get", identity, traceparent, shard=home
            )
        key = home.log.keys.aisdk_chat(identity, turn.chat_id)
        lifetime = home.log.timing.queued_ttl_s  # as its job's keys
        before: bytes | None = await home.arq.set(key, job_id, ex=lifetime, get=True)
        # One answer per chat: a new message ends the one before (useChat stopped reading
        # it, and neither resume nor DELETE could reach it any more).
        if before is not None:
            await cancel_job(state, before.decode())
    except BaseException:
        release()
        raise
    frames = encoded(state, job_id, UIMessageParts(job_id).encode, new_chat=True)
    return event_stream(state, frames, release, headers=HEADERS)


async def resume(request: Request) -> Response:
    state: State = request.app.state.sg
    identity = state.access.identify(request)
    job_id = await _active(state, identity, chat_id_of(request.path_params["chat_id"]))
    if job_id is None:
        return Response(status_code=204)  # nothing to resume: useChat carries on
    release = state.access.take_stream_slot(request, identity)
    frames = encoded(state, job_id, UIMessageParts(job_id).encode)
    resumed = traced(state, job_id, frames, request.headers.get("traceparent"))
    return event_stream(state, resumed, release, headers=HEADERS)


async def cancel(request: Request) -> Response:
    state: State = request.app.state.sg
    identity = state.access.identify(request)
    job_id = await _active(state, identity, chat_id_of(request.path_params["chat_id"]))
    if job_id is not None:
        await cancel_job(state, job_id)
    return Response(status_code=204)


async def _active(state: State, identity: str, chat_id: str) -> str | None:
    """The chat's answer still running (or queued), if any."""
    home = _home(state, identity, chat_id)
    found: bytes | None = await home.arq.get(home.log.keys.aisdk_chat(identity, chat_id))
    if found is None:
        return None
    job_id = found.decode()
    log = state.shards.of_job(job_id).log
    if await log.key_of(job_id) != identity or await log.is_over(job_id):
        return None
    return job_id


def _home(state: State, identity: str, chat_id: str) -> Shard:
    """The shard that keeps which answer of the chat is active, and runs its answers."""
    return state.shards.home(f"{identity}:{chat_id}")
