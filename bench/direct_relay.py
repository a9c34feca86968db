"""The baseline: a gateway that calls the model itself, with no queue in between.

``GET /chat?prompt=`` opens a streaming chat completion on the upstream with httpx, parses
each chunk with orjson and relays every token as an SSE event, then ``done``. It is what a
reasonable single-process relay costs, so that Streamgate's figures have something to be
compared with on the same machine, upstream and clients. It lives in ``bench/`` only: it
has none of Streamgate's guarantees (no resume, no retries, nothing survives a restart).

``python -m bench.direct_relay`` serves it on $PORT against $OPENAI_BASE_URL.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import orjson
import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.gc_tuning import tune_gc

SSE_HEADERS = {"Cache-Control": "no-cache, no-store", "X-Accel-Buffering": "no"}
SYSTEM_PROMPT = "You are a helpful assistant."  # what Streamgate's worker sends too
DONE = b'data: {"lifecycle":"done"}\n\n'


def create_app(base_url: str, model: str = "streamgate-demo") -> Starlette:
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # No pool limit: every open stream holds one upstream connection. Idle ones are kept
        # to 100, as the openai SDK does: httpx scans every pooled connection per request.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
        timeout = httpx.Timeout(connect=5.0, read=60.0, write=30.0, pool=None)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            state["client"] = client
            yield

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def chat(request: Request) -> Response:
        prompt = request.query_params.get("prompt")
        if not prompt:
            return JSONResponse({"error": "prompt is required"}, status_code=400)
        body = orjson.dumps(
            {
                "model": model,
                "stream": True,
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": prompt},
                ],
            }
        )
        return EventSourceResponse(
            _relay(state["client"], f"{base_url}/chat/completions", body),
            headers=SSE_HEADERS,
            ping=10**9,
            sep="\n",
        )

    return Starlette(
        routes=[Route("/chat", chat), Route("/healthz", healthz)],
        lifespan=lifespan,
    )


async def _relay(client: httpx.AsyncClient, url: str, body: bytes) -> AsyncIterator[bytes]:
    """Upstream SSE chunks in, pre-encoded token frames out; one write per upstream read."""
    n = 0
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    try:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            if response.status_code != 200:
                error = {"error": f"the LLM answered HTTP {response.status_code}"}
                yield b"id: 1\ndata: " + orjson.dumps(error) + b"\n\n"
                return
            buffer = b""
            async for chunk in response.aiter_raw():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                frames = []
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        break
                    for choice in orjson.loads(payload).get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            n += 1
                            frames.append(
                                b"id: %d\ndata: " % n + orjson.dumps({"token": text}) + b"\n\n"
                            )
                if frames:
                    yield b"".join(frames)
    except httpx.HTTPError as exc:
        error = {"error": f"upstream failed: {type(exc).__name__}"}
        yield b"id: %d\ndata: " % (n + 1) + orjson.dumps(error) + b"\n\n"
        return
    yield b"id: %d\n" % (n + 1) + DONE


def main() -> None:
    base_url = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8001/v1").rstrip("/")
    app = create_app(base_url)
    tune_gc()  # the same collector settings as the gateway: a like-for-like baseline
    uvicorn.run(
        app,
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8100")),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
