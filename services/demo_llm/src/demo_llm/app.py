"""An OpenAI-compatible server that streams scripted answers: the default model, no key needed.

It speaks just enough of the API for the ``openai`` SDK: ``GET /v1/models`` and
``POST /v1/chat/completions`` (streaming or not). ``GET /demo/stats`` counts requests and
open streams, so tests can prove that a cancel closed the upstream request.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .scripts import DirectiveError, Script, plan
from .settings import DELAY_S_DEFAULT

MODEL = "streamgate-demo"


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.open_streams = 0
        self.closed_early = 0


def _tool_names(tools: object) -> list[str]:
    if not isinstance(tools, list):
        return []
    functions = [t.get("function") for t in tools if isinstance(t, dict)]
    return [str(f.get("name")) for f in functions if isinstance(f, dict)]


def _error(status: int, message: str) -> JSONResponse:
    kinds = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
    body = {
        "error": {
            "message": message,
            "type": kinds.get(status, "server_error"),
            "code": kinds.get(status),
        }
    }
    return JSONResponse(body, status_code=status)


def _chunk(completion_id: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def create_app(default_delay_s: float | None = None) -> Starlette:
    delay_s = (
        float(os.environ.get("DEMO_LLM_DELAY_S") or DELAY_S_DEFAULT)
        if default_delay_s is None
        else default_delay_s
    )
    stats = Stats()

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "streamgate"}],
            }
        )

    async def completions(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
            messages = body["messages"]
            assert isinstance(messages, list)
        except (orjson.JSONDecodeError, KeyError, TypeError, AssertionError):
            return _error(400, "the body must be JSON with a 'messages' list")
        stats.requests += 1
        try:
            params = {k: v for k, v in body.items() if k not in ("messages", "tools")}
            script = plan(messages, delay_s, _tool_names(body.get("tools")), params)
        except DirectiveError as exc:
            return _error(400, str(exc))
        if script.http_status is not None:
            return _error(script.http_status, f"demo error {script.http_status} as requested")
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and 0 < limit < len(script.tokens):
            script.tokens, finish = script.tokens[:limit], "length"
        # Counted as the demo counts tokens: words of the messages, tokens sent.
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in messages)
        usage = _usage(prompt_tokens, len(script.tokens) + len(script.tool_calls))
        if not body.get("stream"):
            return JSONResponse(_complete(completion_id, script, finish, usage))
        options = body.get("stream_options") or {}
        with_usage = usage if isinstance(options, dict) and options.get("include_usage") else None
        return StreamingResponse(
            _stream(completion_id, script, stats, finish, with_usage),
            media_type="text/event-stream",
        )

    async def demo_stats(request: Request) -> Response:
        return JSONResponse(vars(stats))

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/demo/stats", demo_stats),
        ]
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _complete(
    completion_id: str, script: Script, finish: str, usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "finish_reason": finish,
                "message": {"role": "assistant", "content": "".join(script.tokens)},
            }
        ],
        "usage": usage,
    }


def _tool_call_deltas(script: Script) -> list[dict[str, Any]]:
    """Each call's id and name first, then its arguments 3 characters at a time, the calls
    interleaved as a model streams parallel calls."""
    per_call: list[list[dict[str, Any]]] = []
    for index, call in enumerate(script.tool_calls):
        pieces: list[dict[str, Any]] = [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
        ]
        pieces += [
            {"function": {"arguments": call.arguments[i : i + 3]}}
            for i in range(0, len(call.arguments), 3)
        ]
        if script.with_index:
            for piece in pieces:
                piece["index"] = index
        per_call.append(pieces)
    if not script.with_index:
        # Without an index a client can only tell calls apart by order: no interleaving.
        return [piece for pieces in per_call for piece in pieces]
    deltas: list[dict[str, Any]] = []
    for step in range(max(len(p) for p in per_call)):
        deltas += [pieces[step] for pieces in per_call if step < len(pieces)]
    return deltas


def _stamped(token: str) -> str:
    word = token.rstrip()
    return f"{word}@{time.monotonic_ns() // 1000}{token[len(word) :]}"


def _usage_chunk(completion_id: str, usage: dict[str, int]) -> bytes:
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": MODEL,
        "choices": [],
        "usage": usage,
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def _stream(
    completion_id: str,
    script: Script,
    stats: Stats,
    finish: str = "stop",
    usage: dict[str, int] | None = None,
) -> AsyncIterator[bytes]:
    stats.open_streams += 1
    finished = False
    try:
        if script.wait_s:
            await asyncio.sleep(script.wait_s)
        yield _chunk(completion_id, {"role": "assistant", "content": ""})
        for token in script.tokens:
            if script.delay_s:
                await asyncio.sleep(script.delay_s)
            yield _chunk(completion_id, {"content": _stamped(token) if script.stamp else token})
        if script.tool_calls:
            for delta in _tool_call_deltas(script):
                if script.delay_s:
                    await asyncio.sleep(script.delay_s)
                yield _chunk(completion_id, {"tool_calls": [delta]})
            yield _chunk(completion_id, {}, finish="tool_calls")
            if usage is not None:
                yield _usage_chunk(completion_id, usage)
            yield b"data: [DONE]\n\n"
            finished = True
            return
        if script.then == "fail":
            raise ConnectionAbortedError("demo: dropping the connection mid-stream")
        if script.then == "drop-end":
            yield _chunk(completion_id, {}, finish=finish)
            raise ConnectionAbortedError("demo: dropping the connection after the finish")
        if script.then == "error":
            error = {
                "error": {"message": "demo error mid-stream, as requested", "type": "server_error"}
            }
            yield b"data: " + orjson.dumps(error) + b"\n\n"
            finished = True
            return
        if script.then == "stall":
            await asyncio.sleep(3600)
        if script.then == "cut":
            finished = True
            return  # the HTTP response ends cleanly, the answer does not
        yield _chunk(completion_id, {}, finish=finish)
        if usage is not None:
            yield _usage_chunk(completion_id, usage)
        yield b"data: [DONE]\n\n"
        finished = True
    finally:
        stats.open_streams -= 1
        if not finished:
            stats.closed_early += 1
