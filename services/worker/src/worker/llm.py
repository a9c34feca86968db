"""The upstream LLM: the only module that imports ``openai``.

The SDK still makes the request (auth, retries before the stream starts, its error types),
but the stream is read raw and each chunk parsed with orjson: building the SDK's pydantic
models costs ~0.5 ms of CPU per chunk, ten times what the rest of a token's path costs.
The read timeout of the HTTP client is the upstream idle timeout: it bounds every wait for
the next bytes, the first included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import httpx2
import openai
import orjson

from shared import events as ev
from shared import tracing
from shared.settings import Settings

# What ``with_streaming_response`` sends: the SDK then returns the response unparsed.
logger = logging.getLogger(__name__)
E = TypeVar("E", bound=BaseException)

RAW_RESPONSE_HEADER = "X-Stainless-Raw-Response"


class UpstreamError(Exception):
    """The LLM request failed. ``message`` says what happened in words a user can act on;
    ``detail`` is the operator's part (the upstream's URL, its error body), logged with the
    job and shown to users only with EXPOSE_ERROR_DETAILS."""

    def __init__(self, message: str, kind: str = "other", detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind  # for metrics: auth, rate_limit, status, timeout, connection, ...
        self.detail = detail

    @property
    def detailed(self) -> str:
        return f"{self.message} ({self.detail})" if self.detail else self.message


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int
    call_id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str


Delta = TextDelta | ToolCallDelta | Finish | ev.Usage


@dataclass
class PendingCall:
    call_id: str
    name: str
    arguments: list[str] = field(default_factory=list)


class ToolCallAssembler:
    """Puts streamed tool-call pieces back together, in the order the calls started. Some
    servers (Ollama) omit the index or reuse 0 for parallel calls: a new id at a known index
    starts a new call."""

    def __init__(self) -> None:
        self.calls: list[PendingCall] = []
        self._by_index: dict[int, PendingCall] = {}

    def add(self, delta: ToolCallDelta) -> PendingCall | None:
        """Take one piece; returns the call if this piece started it."""
        current = self._by_index.get(delta.index)
        started = None
        if current is None or (delta.call_id and delta.call_id != current.call_id):
            call_id = delta.call_id or f"call_{len(self.calls)}"
            current = started = PendingCall(call_id, delta.name or "")
            self.calls.append(current)
            self._by_index[delta.index] = current
        elif delta.name and not current.name:
            current.name = delta.name
        if delta.arguments:
            current.arguments.append(delta.arguments)
        return started


Opening = asyncio.Future[openai.AsyncAPIResponse[object]]  # a request sent, not yet read


class Upstream:
    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.openai_base_url
        self.host = urlsplit(settings.openai_base_url).hostname or ""
        self.model = settings.openai_model
        self.log_prompts = settings.log_prompts  # prompts and answers in spans too
        self.idle_timeout_s = settings.upstream_idle_timeout_s
        self._turns = asyncio.Lock()
        self.client = openai.AsyncOpenAI(
            base_url=settings.openai_base_url,
            # The SDK refuses an empty key; servers without auth (the demo LLM, Ollama) ignore it.
            api_key=settings.openai_api_key or "no-key",
            max_retries=settings.openai_max_retries,
            timeout=openai.Timeout(
                connect=5.0, read=settings.upstream_idle_timeout_s, write=30.0, pool=30.0
            ),
            # aiohttp under the SDK: its C parser reads a streamed body for a fraction of
            # the CPU of the default transport, and the pool keeps a connection per job.
            http_client=openai.DefaultAioHttpClient(
                # One upstream request per running job, and a few to spare: aiohttp's own
                # default caps a worker at 100 (and a job waiting past it times out).
                limits=httpx2.Limits(
                    max_connections=settings.worker_max_jobs + 16,
                    max_keepalive_connections=settings.worker_max_jobs,
                ),
            ),
        )

    async def close(self) -> None:
        await self.client.close()

    async def _take_turn(self) -> None:
        """Let requests through one at a time, an event-loop round or two apart.
        Building a request costs the SDK ~0.7 ms of CPU before its first await: 200 jobs
        starting at once would hold the loop for ~150 ms, and every running stream's
        tokens with it (paced200 measured tokens 60-110 ms late at p99). One at a time,
        the loop reads sockets in between."""
        async with self._turns:
            await asyncio.sleep(0)

    def open(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Opening:
        """Send the request now, in the background; ``stream(opened=...)`` reads it, or
        ``abandon`` closes it. Errors surface in ``stream``."""
        return asyncio.ensure_future(self._post(messages, tools, params))

    async def abandon(self, opening: Opening) -> None:
        """Close a request ``open`` sent and nobody will read."""
        opening.cancel()
        with contextlib.suppress(BaseException):
            response = await opening
            await response.close()

    async def _post(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        params: dict[str, Any] | None,
    ) -> openai.AsyncAPIResponse[object]:
        await self._take_turn()
        body: dict[str, Any] = {
            **(params or {}),  # the client's temperature, max_tokens, tool_choice... (checked)
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},  # for ``done``'s usage
        }
        if tools:
            body["tools"] = tools
        else:  # both are refused without tools
            body.pop("tool_choice", None)
            body.pop("parallel_tool_calls", None)
        # The client's generic POST (the SDK's documented way to any endpoint), asking for
        # the raw streamed response: the typed ``create`` re-validates the messages and
        # tools of every request, a millisecond of CPU spent on data built here. The SDK
        # retries a request whose answer did not begin within its read timeout: one
        # deadline over them all, or a silent upstream took the idle timeout thrice.
        async with asyncio.timeout(self.idle_timeout_s):
            return cast(
                "openai.AsyncAPIResponse[object]",
                await self.client.post(
                    "/chat/completions",
                    cast_to=object,
                    body=body,
                    options={"headers": {RAW_RESPONSE_HEADER: "stream"}},
                    stream=True,
                    stream_cls=openai.AsyncStream[object],
                ),
            )

    def stream(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        opened: Opening | None = None,
        params: dict[str, Any] | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream one chat completion as deltas (of the request ``opened`` sent for these
        messages, if given); raises UpstreamError on any failure, an answer that ends
        without ``[DONE]`` or a finish reason included (it is incomplete). Traced as a
        GenAI ``chat`` span when tracing is on; untraced, not one more step per token."""
        deltas = self._stream(messages, tools, opened, params)
        return self._traced(messages, deltas) if tracing.enabled() else deltas

    async def _traced(
        self, messages: list[dict[str, Any]], deltas: AsyncGenerator[Delta, None]
    ) -> AsyncIterator[Delta]:
        """``deltas`` under a GenAI ``chat`` span."""
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": self.model,
            "server.address": self.host,
        }
        if self.log_prompts:
            attributes["gen_ai.input.messages"] = orjson.dumps(messages).decode()
        span = tracing.start(f"chat {self.model}", kind="CLIENT", attributes=attributes)
        assert span is not None
        began = time.monotonic()
        first = True
        text: list[str] = []
        calls = ToolCallAssembler()
        try:
            async for delta in deltas:
                if first:
                    first = False
                    span.set_attribute(
                        "gen_ai.response.time_to_first_chunk", time.monotonic() - began
                    )
                if isinstance(delta, Finish):
                    span.set_attribute("gen_ai.response.finish_reasons", [delta.reason])
                elif isinstance(delta, ev.Usage):
                    span.set_attribute("gen_ai.usage.input_tokens", delta.prompt_tokens)
                    span.set_attribute("gen_ai.usage.output_tokens", delta.completion_tokens)
                elif isinstance(delta, TextDelta) and self.log_prompts:
                    text.append(delta.text)
                elif isinstance(delta, ToolCallDelta) and self.log_prompts:
                    calls.add(delta)
                yield delta
        except UpstreamError as exc:
            tracing.failed(span, exc.message, exc.kind)
            raise
        finally:
            if text or calls.calls:
                parts = [{"type": "text", "content": "".join(text)}] if text else []
                parts += [
                    {
                        "type": "tool_call",
                        "id": call.call_id,
                        "name": call.name,
                        "arguments": "".join(call.arguments),
                    }
                    for call in calls.calls
                ]
                answer = [{"role": "assistant", "parts": parts}]
                span.set_attribute("gen_ai.output.messages", orjson.dumps(answer).decode())
            span.end()
            await deltas.aclose()  # a consumer that stopped early closes the request too

    def _timed_out(self, exc: BaseException) -> UpstreamError:
        """The error of a wait that timed out: a read's, or the deadline over the wait for
        the answer to begin. If the deadline fell while the SDK waited to retry, what it
        retried is the error (a 429's Retry-After, a 5xx, a refused connect)."""
        refused = _cause(exc, httpx2.HTTPStatusError)
        if refused is not None and refused.response.status_code == 429:
            return UpstreamError(
                "the LLM is rate limiting requests (HTTP 429); retry later", "rate_limit"
            )
        if refused is not None:
            return UpstreamError(f"the LLM answered HTTP {refused.response.status_code}", "status")
        # a ConnectTimeout is also how aiohttp reports a refusal
        if _caused_by(exc, httpx2.ConnectTimeout) or _caused_by(exc, httpx2.ConnectError):
            return UpstreamError(
                "could not reach the LLM",
                "connection",
                f"at {self.base_url}; check OPENAI_BASE_URL",
            )
        return UpstreamError(
            f"the LLM sent nothing for {self.idle_timeout_s:g} s (UPSTREAM_IDLE_TIMEOUT_S);"
            " the answer is incomplete",
            "timeout",
        )

    async def _stream(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        opened: Opening | None,
        params: dict[str, Any] | None,
    ) -> AsyncGenerator[Delta, None]:
        try:
            response = await (opened if opened is not None else self._post(messages, tools, params))
            finished = False
            try:
                try:
                    async for line in sse_lines(response.iter_bytes()):
                        if not line.startswith(b"data:"):
                            continue  # blank separators, comments, event: lines
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            return
                        for delta in parse_chunk(payload):
                            finished = finished or isinstance(delta, Finish)
                            yield delta
                except (httpx2.TransportError, httpx2.StreamError):
                    if not finished:
                        raise
                    # A finish reason came: the answer is whole, only its end was lost
                    # (the usage that may follow it, and [DONE]).
                    logger.info("the LLM's connection ended after its finish reason")
                    return
                if not finished:
                    raise UpstreamError(
                        "the LLM's answer ended without [DONE] or a finish reason; the answer"
                        " is incomplete",
                        "incomplete",
                    )
            finally:
                await response.close()  # closes the upstream request: no more tokens billed
        except openai.AuthenticationError as exc:
            raise UpstreamError(
                "the LLM refused the service's API key (HTTP 401)",
                "auth",
                f"check OPENAI_API_KEY; the LLM said: {_detail(exc)}",
            ) from exc
        except openai.RateLimitError as exc:
            raise UpstreamError(
                "the LLM is rate limiting requests (HTTP 429); retry later",
                "rate_limit",
                f"the LLM said: {_detail(exc)}",
            ) from exc
        except openai.APIStatusError as exc:
            raise UpstreamError(
                f"the LLM answered HTTP {exc.status_code}", "status", f"it said: {_detail(exc)}"
            ) from exc
        except (openai.APITimeoutError, httpx2.TimeoutException, TimeoutError) as exc:
            raise self._timed_out(exc) from exc
        except openai.APIConnectionError as exc:
            raise UpstreamError(
                "could not reach the LLM",
                "connection",
                f"at {self.base_url}; check OPENAI_BASE_URL: {exc}",
            ) from exc
        except (httpx2.TransportError, httpx2.StreamError) as exc:
            raise UpstreamError(
                "the connection to the LLM was lost mid-answer; the answer is incomplete",
                "connection",
                f"{type(exc).__name__}: {exc}",
            ) from exc


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    return _cause(exc, kind) is not None


def _cause(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of ``kind`` in ``exc``'s chain, if any."""
    seen: BaseException | None = exc
    visited: set[int] = set()  # a chain may loop (an exception raised again from its wrapper)
    while seen is not None and id(seen) not in visited:
        if isinstance(seen, kind):
            return seen
        visited.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    return None


def _detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if message:
            return str(message)[:300]
    return exc.message[:300]


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """SSE lines split on LF (CRLF too) only: ``str.splitlines`` would also split on U+2028
    and other separators that JSON may carry unescaped inside a token."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line[:-1] if line.endswith(b"\r") else line
    if buffer:
        yield buffer


def _lenient(payload: bytes, exc: orjson.JSONDecodeError) -> Any:
    """A chunk orjson refuses that is JSON all the same: a lone surrogate's escape
    (``"\\ud800"``), which Python's ``json`` reads; its text made well-formed."""
    try:
        return ev.well_formed(json.loads(payload))
    except (ValueError, RecursionError):
        malformed = "the LLM sent a malformed stream chunk (not JSON)"
        raise UpstreamError(malformed, "malformed") from exc


def parse_chunk(payload: bytes) -> list[Delta]:
    """The deltas of one ``chat.completion.chunk``, or UpstreamError for an error chunk."""
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        chunk = _lenient(payload, exc)
    if not isinstance(chunk, dict):
        raise UpstreamError("the LLM sent a malformed stream chunk (not an object)", "malformed")
    if chunk.get("error"):
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else str(error)
        raise UpstreamError(
            "the LLM reported an error mid-answer", "stream", f"it said: {str(message)[:300]}"
        )
    deltas: list[Delta] = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if text:
            deltas.append(TextDelta(text))
        for position, call in enumerate(delta.get("tool_calls") or ()):
            function = call.get("function") or {}
            deltas.append(
                ToolCallDelta(
                    index=call.get("index", position),
                    call_id=call.get("id"),
                    name=function.get("name"),
                    arguments=function.get("arguments") or "",
                )
            )
        if choice.get("finish_reason"):
            deltas.append(Finish(choice["finish_reason"]))
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        counts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
        if all(isinstance(n, int) for n in counts):
            deltas.append(ev.Usage(*counts))  # type: ignore[arg-type]
    return deltas
