"""A strict SSE reader for the tests: it checks the wire format as PROTOCOL.md states it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Message:
    id: str
    data: dict[str, Any]


@dataclass
class Stream:
    status: int
    headers: httpx.Headers
    messages: list[Message] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    raw: bytes = b""
    after_final: bytes = b""  # anything the server sent after the final event
    elapsed: float = 0.0
    cut: bool = False  # the connection broke before the server closed it

    @property
    def events(self) -> list[dict[str, Any]]:
        return [m.data for m in self.messages]

    @property
    def text(self) -> str:
        return "".join(e["token"] for e in self.events if "token" in e)

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [e for e in self.events if is_final(e)]

    @property
    def last_id(self) -> str:
        return self.messages[-1].id


def is_done(event: dict[str, Any]) -> bool:
    """``done``, whatever else it carries (finish_reason, usage)."""
    return event.get("lifecycle") == "done" and "error" not in event


def ends_done(stream: Stream) -> bool:
    """One final event, and it is ``done``."""
    return len(stream.finals) == 1 and is_done(stream.finals[0])


def is_final(event: dict[str, Any]) -> bool:
    return "error" in event or event.get("lifecycle") == "done"


def parse(raw: bytes) -> tuple[list[Message], list[str], bytes]:
    """Messages, comments, and the bytes after the final event; raises on any deviation."""
    messages: list[Message] = []
    comments: list[str] = []
    final_at: int | None = None
    position = 0
    for raw_block in raw.split(b"\n\n"):
        end = position + len(raw_block) + 2
        block = raw_block.decode("utf-8")
        if final_at is None and block:
            assert "\r" not in block, f"raw CR in an SSE block: {block!r}"
            lines = block.split("\n")
            if all(line.startswith(":") for line in lines):
                comments += [line[1:].strip() for line in lines]
            else:
                assert len(lines) == 2, f"expected id and data lines: {block!r}"
                assert lines[0].startswith("id: "), block
                assert lines[1].startswith("data: "), block
                data = json.loads(lines[1][6:])
                assert isinstance(data, dict), block
                messages.append(Message(lines[0][4:], data))
                if is_final(data):
                    final_at = end
        position = end
    after = raw[final_at:] if final_at is not None else b""
    return messages, comments, after


def read(
    client: httpx.Client,
    url: str,
    params: dict[str, str] | list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    stop_after: int | None = None,
    on_chunk: Callable[[bytes], None] | None = None,
) -> Stream:
    """Read a whole SSE response (or ``stop_after`` messages, then drop the connection).
    ``on_chunk`` is given each chunk as it arrives: a test can act once the stream flows."""
    started = time.monotonic()
    with client.stream("GET", url, params=params, headers=headers, timeout=timeout) as response:
        stream = Stream(response.status_code, response.headers)
        if response.status_code != 200 or not response.headers.get("content-type", "").startswith(
            "text/event-stream"
        ):
            stream.raw = response.read()
            return stream
        chunks = []
        try:
            for chunk in response.iter_raw():
                chunks.append(chunk)
                if on_chunk is not None:
                    on_chunk(chunk)
                if stop_after is not None and b"".join(chunks).count(b"\ndata: ") >= stop_after:
                    break
        except (httpx.RemoteProtocolError, httpx.ReadError):
            stream.cut = True  # the server went away mid-stream
        stream.raw = b"".join(chunks)
    if stop_after is not None or stream.cut:
        # Keep only whole messages: the connection was dropped mid-stream.
        stream.raw = stream.raw[: stream.raw.rfind(b"\n\n") + 2]
    stream.messages, stream.comments, stream.after_final = parse(stream.raw)
    stream.elapsed = time.monotonic() - started
    return stream


async def aread(
    client: httpx.AsyncClient,
    url: str,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    read_timeout: float = 60.0,
) -> Stream:
    """``read`` for asyncio clients, for tests that hold many streams at once."""
    started = time.monotonic()
    async with client.stream(
        "GET", url, params=params, headers=headers, timeout=read_timeout
    ) as response:
        stream = Stream(response.status_code, response.headers)
        stream.raw = b"".join([chunk async for chunk in response.aiter_raw()])
    if stream.status == 200:
        stream.messages, stream.comments, stream.after_final = parse(stream.raw)
    stream.elapsed = time.monotonic() - started
    return stream
