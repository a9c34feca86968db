"""Long GET prompts: any prompt within MAX_PROMPT_CHARS fits a GET (the only method a
browser's EventSource has); a request line past what one needs is a 414 with a JSON error."""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
from urllib.parse import quote, urlsplit

import orjson

from . import sse
from .harness import Stack

LIMIT = 32000  # MAX_PROMPT_CHARS's default, the stack's


def get(stack: Stack, target: str) -> tuple[int, bytes]:
    """A GET with http.client: httpx refuses URLs over 64 KB itself."""
    address = urlsplit(stack.gateway.url)
    conn = http.client.HTTPConnection(address.hostname or "", address.port, timeout=60)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_get_prompt_of_the_limit_in_emoji_reaches_the_model_whole(stack: Stack) -> None:
    prompt = "[echo] " + "😀" * (LIMIT - 7)  # 384 KB percent-encoded, past httptools' 64 KB
    status, raw = get(stack, f"/chat?prompt={quote(prompt)}")
    assert status == 200, raw[:300]
    messages, _, after_final = sse.parse(raw)
    assert sse.is_done(messages[-1].data)
    assert after_final == b""
    text = "".join(m.data["token"] for m in messages if "token" in m.data)
    assert orjson.loads(text)[-1] == {"role": "user", "content": prompt}


def test_one_character_over_is_a_413(stack: Stack) -> None:
    status, body = get(stack, f"/chat?prompt={quote('é' * (LIMIT + 1))}")
    assert status == 413
    assert "MAX_PROMPT_CHARS" in orjson.loads(body)["error"]


def test_a_request_line_past_any_prompt_is_a_414(stack: Stack) -> None:
    for target in (
        "/chat?prompt=" + "%F0%9F%98%80" * (LIMIT + 400),  # a query past the limit
        "/chat?prompt=" + "a" * 5_000_000,  # far past: still read whole, the 414 not lost
        "/" + "a" * 70_000,  # a path longer than httptools can parse
    ):
        status, body = get(stack, target)
        assert status == 414, body[:300]
        assert "POST /chat" in orjson.loads(body)["error"]


def test_a_414_reaches_a_client_still_sending(stack: Stack) -> None:
    """The gateway refuses early but reads on: a close with the client's bytes unread
    would reset the connection, and the reset drop the 414 before the client reads it."""
    address = urlsplit(stack.gateway.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as conn:
        conn.sendall(b"GET /chat?prompt=" + b"a" * 5_000_000)
        time.sleep(0.3)  # the refusal is written meanwhile
        conn.sendall(b" HTTP/1.1\r\nHost: x\r\n\r\n")
        received = conn.recv(65536)
    assert received.startswith(b"HTTP/1.1 414"), received[:100]


def test_the_connection_serves_on_after_a_long_target(stack: Stack) -> None:
    """Keep-alive: a long target's request and the next one on the same connection."""
    address = urlsplit(stack.gateway.url)
    long_head = f"HEAD /chat?prompt={'%C3%A9' * 20_000} HTTP/1.1\r\nHost: x\r\n\r\n"
    short = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((address.hostname, address.port), timeout=10) as conn:
        conn.sendall((long_head + short).encode())
        received = b""
        while received.count(b"HTTP/1.1 200") < 2:
            chunk = conn.recv(65536)
            assert chunk, received
            received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    assert b"text/event-stream" in received


def test_a_414_never_lands_inside_a_pipelined_response(stack: Stack) -> None:
    """A long target pipelined behind a streaming answer: HTTP/1.1 answers in order, so the
    414 comes once that answer has ended, never inside its body."""
    address = urlsplit(stack.gateway.url)
    first = "GET /chat?prompt=%5Blong%2040%5D%20%5Bdelay%200.05%5D HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((address.hostname, address.port), timeout=10) as conn:
        conn.sendall(first.encode())
        received = conn.recv(65536)
        assert received.startswith(b"HTTP/1.1 200"), received[:100]
        conn.sendall(b"GET /chat?prompt=" + b"a" * 2_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):  # closed with the long one unread
            while chunk := conn.recv(65536):
                received += chunk
    assert b"text/event-stream" in received.partition(b"\r\n\r\n")[0]
    stream, end, after = received.partition(b"\r\n0\r\n\r\n")  # the chunked body's end
    assert end and b'"lifecycle":"done"' in stream and b"HTTP/1.1 414" not in stream
    assert after.startswith(b"HTTP/1.1 414")
