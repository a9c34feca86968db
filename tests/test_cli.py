"""The ``streamgate`` CLI as a real subprocess: against the real stack, and against a tiny
scripted gateway (http.server in a thread) that drops connections where we say, to prove
that resuming neither repeats nor loses a token."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import tty
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from demo_llm.scripts import HARD_TOKENS, demo_answer
from streamgate_cli.client import ConnectionLost, Event, EventStream, GatewayError

from . import sse
from .harness import Stack, free_port

CLI = [sys.executable, "-m", "streamgate_cli.main"]


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Result:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGATE_")}
    done = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        env={**clean, "PYTHONIOENCODING": "utf-8", **(env or {})},
        timeout=timeout,
    )
    # Bytes decoded by hand: text mode would turn the answer's "\r\n" into "\n".
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


def cli_on_terminal(*args: str) -> Result:
    """``cli``, with stdout and stderr on one pseudo-terminal (raw: no newline translation),
    so that the CLI knows it writes to a terminal; ``out`` is what the terminal got."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGATE_")}
    master, slave = pty.openpty()
    tty.setraw(slave)
    with subprocess.Popen(
        [*CLI, *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env={**clean, "PYTHONIOENCODING": "utf-8"},
    ) as proc:
        os.close(slave)
        got = b""
        deadline = time.monotonic() + 60  # as cli()'s timeout: a CLI that hangs fails
        with contextlib.suppress(OSError):  # EIO: the CLI has exited, closing the terminal
            while select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0]:
                if not (chunk := os.read(master, 65536)):
                    break
                got += chunk
        code = proc.wait(30)
    os.close(master)
    return Result(code, got.decode(), "")


def json_lines(out: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in out.splitlines()]
    assert all(set(line) == {"id", "data"} for line in lines), lines
    return lines


def text_of(lines: list[dict[str, Any]]) -> str:
    return "".join(line["data"]["token"] for line in lines if "token" in line["data"])


# --- against the real stack -------------------------------------------------------------


def test_chat_prints_the_answer_and_exits_0(stack: Stack) -> None:
    result = cli("chat", "hello", "--url", stack.gateway.url)
    assert result.code == 0, result.err
    assert result.out == "".join(demo_answer("hello")) + "\n"
    assert result.err == ""


def test_chat_prints_hard_tokens_exactly(stack: Stack) -> None:
    result = cli("--url", stack.gateway.url, "chat", "[hard]")
    assert result.code == 0, result.err
    assert result.out == "".join(HARD_TOKENS) + "\n"


def test_json_prints_every_event_ending_with_done(stack: Stack) -> None:
    result = cli("chat", "[long 30]", "--json", "--url", stack.gateway.url)
    assert result.code == 0, result.err
    lines = json_lines(result.out)
    assert lines[0]["data"]["lifecycle"] == "queued"
    assert sse.is_done(lines[-1]["data"])
    ids = [line["id"] for line in lines]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith(lines[0]["data"]["job_id"]) for i in ids)
    assert text_of(lines) == "".join(f"t{i} " for i in range(30))


def test_error_event_exits_1_with_the_message_on_stderr(stack: Stack) -> None:
    result = cli("chat", "[error-mid]", "--url", stack.gateway.url)
    assert result.code == 1
    assert result.err.startswith("error: ")
    assert "error mid-answer" in result.err
    assert result.out.endswith("\n")


def test_events_follows_a_posted_job_from_start_or_cursor(stack: Stack) -> None:
    posted = httpx.post(stack.gateway.url + "/chat", json={"prompt": "[long 40]"}, timeout=10)
    assert posted.status_code == 202
    job_id = posted.json()["job_id"]

    text = cli("events", job_id, "--url", stack.gateway.url)
    assert text.code == 0, text.err
    assert text.out == "".join(f"t{i} " for i in range(40)) + "\n"

    every = json_lines(cli("events", job_id, "--json", "--url", stack.gateway.url).out)
    after = cli("events", job_id, "--after", every[5]["id"], "--json", "--url", stack.gateway.url)
    assert after.code == 0, after.err
    assert json_lines(after.out) == every[6:]

    # A cursor that is already the final event: the gateway answers 204, nothing to show.
    ended = cli("events", job_id, "--after", every[-1]["id"], "--url", stack.gateway.url)
    assert (ended.code, ended.out) == (0, "")


def test_bad_request_exits_2_with_the_gateways_message(stack: Stack) -> None:
    result = cli("chat", "  ", "--url", stack.gateway.url)
    assert result.code == 2
    assert result.err == "error: prompt is empty\n"
    unknown = cli("events", "0" * 32, "--url", stack.gateway.url)
    assert unknown.code == 2
    assert "no job" in unknown.err


def test_unreachable_gateway_exits_2_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = cli("chat", "hello", env={"STREAMGATE_URL": url}, timeout=20)
    assert result.code == 2
    assert f"could not reach the gateway at {url}" in result.err


def test_a_url_that_is_not_http_is_a_usage_error() -> None:
    result = cli("chat", "hello", "--url", "localhost:8000")
    assert result.code == 2
    assert "http://" in result.err


def test_ctrl_c_cancels_the_job_and_exits_130(stack: Stack) -> None:
    proc = subprocess.Popen(
        [*CLI, "chat", "[long 500] [delay 0.05]", "--json", "--url", stack.gateway.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        job_id = json.loads(proc.stdout.readline())["data"]["job_id"]
        while "token" not in json.loads(proc.stdout.readline())["data"]:
            pass
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 130
        assert f"cancelled job {job_id}" in proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    with httpx.Client(timeout=10) as client:
        stream = sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events")
    assert stream.events[-1] == {"error": "cancelled"}


class CutFirst(socketserver.ThreadingTCPServer):
    """A TCP proxy to the gateway that cuts its first connection once the gateway has begun
    to answer (so the job exists) but before the client has any of it; the rest pass."""

    daemon_threads = True

    def __init__(self, target: str) -> None:
        super().__init__(("127.0.0.1", 0), _CutFirstHandler)
        parts = urlsplit(target)
        self.target = (parts.hostname or "", parts.port or 80)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.cut = False
        self.first_answer = b""
        self.lock = threading.Lock()


class _CutFirstHandler(socketserver.BaseRequestHandler):
    server: CutFirst

    def handle(self) -> None:
        client: socket.socket = self.request
        with socket.create_connection(self.server.target) as upstream:
            with self.server.lock:
                first, self.server.cut = not self.server.cut, True
            if first:
                self.server.first_answer = self._cut(client, upstream)
                return
            forward = threading.Thread(target=_pipe, args=(client, upstream), daemon=True)
            forward.start()
            _pipe(upstream, client)
            forward.join(5)

    def _cut(self, client: socket.socket, upstream: socket.socket) -> bytes:
        """Pass the request on, read the gateway's answer up to its first event, pass on its
        head alone (a 200: the job exists), then drop both."""
        request = b""
        while b"\r\n\r\n" not in request and (chunk := client.recv(65536)):
            request += chunk
        upstream.sendall(request)
        answer = b""
        while b"data:" not in answer and (chunk := upstream.recv(65536)):
            answer += chunk
        head, _, _ = answer.partition(b"\r\n\r\n")
        client.sendall(head + b"\r\n\r\n")
        return answer


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def cut_first(stack: Stack) -> Iterator[CutFirst]:
    proxy = CutFirst(stack.gateway.url)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()
    thread.join(5)


def test_a_session_chat_lost_before_its_first_event_follows_its_own_job(
    cut_first: CutFirst,
) -> None:
    # Sent again, the chat meets its own job in the session's 409 and follows it from the
    # start: neither "session is still answering" (exit 2) nor a job left unread.
    session = f"cli-{uuid.uuid4().hex}"
    result = cli("chat", "[long 40] [delay 0.03]", "--session", session, "--url", cut_first.url)
    assert result.code == 0, result.err
    assert result.out == "".join(f"t{i} " for i in range(40)) + "\n"
    found = re.search(rb'"job_id": ?"([0-9a-f]{32})"', cut_first.first_answer)
    assert found is not None, cut_first.first_answer
    assert f"following job {found.group(1).decode()}" in result.err


# --- against a scripted gateway that drops connections ------------------------------------

JOB = "ab" * 16
TOKENS = ["Hello", " wörld", "\n", "😀🎉", " data: x", "\r\n", " id: 7", " end."]


def scripted(*events: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The events with cursors as the gateway makes them: ``<job_id>_<entry id>``."""
    return [(f"{JOB}_{n}-0", data) for n, data in enumerate(events, start=1)]


SCRIPT = scripted(
    {"lifecycle": "queued", "job_id": JOB, "position": 1},
    {"lifecycle": "started", "job_id": JOB},
    *({"token": t} for t in TOKENS),
    {"lifecycle": "done"},
)


@dataclass
class Seen:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class Fake:
    """What the scripted gateway serves: per connection, how many events before it drops
    (None: all of them) and the HTTP status to answer first."""

    url: str = ""
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=lambda: list(SCRIPT))
    cuts: list[int | None] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    error: dict[str, Any] | None = None  # the body of an error status, if not the scripted one
    drop: str = "close"  # close | half | chunked | stall
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: Fake


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_DELETE(self) -> None:
        self._record()
        self.send_response(204)
        self.end_headers()

    def do_GET(self) -> None:
        fake = self.server.fake
        self._record()
        with fake.lock:
            status = fake.statuses.pop(0) if fake.statuses else 200
            cut = fake.cuts.pop(0) if fake.cuts else None
        cursor = self.headers.get("Last-Event-ID")
        ids = [event_id for event_id, _ in fake.events]
        start = ids.index(cursor) + 1 if cursor else 0
        if start == len(ids):
            self.send_response(204)
            self.end_headers()
            return
        if status != 200:
            body = json.dumps(fake.error or {"error": f"scripted {status}"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        chunked = fake.drop == "chunked"
        if chunked:
            self.protocol_version = "HTTP/1.1"
            self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        batch = fake.events[start:] if cut is None else fake.events[start : start + cut]
        for event_id, data in batch:
            frame = f"id: {event_id}\ndata: {json.dumps(data)}\n\n: ping\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame) if chunked else frame)
            self.wfile.flush()
        if cut is None:
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            return
        following = fake.events[start + cut] if start + cut < len(ids) else None
        half = f"id: {following[0]}\ndata: {json.dumps(following[1])[:5]}" if following else ""
        if fake.drop == "half":
            self.wfile.write(half.encode())
        elif fake.drop == "chunked":
            self.wfile.write(b"100\r\n" + half.encode())  # a chunk cut short
        elif fake.drop == "stall":
            fake.release.wait(30)

    def _record(self) -> None:
        parts = urlsplit(self.path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        seen = Seen(parts.path, parse_qs(parts.query), headers)
        with self.server.fake.lock:
            self.server.fake.seen.append(seen)


@pytest.fixture
def fake() -> Iterator[Fake]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = Fake(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.fake
    server.fake.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


EXPECTED_TEXT = "".join(TOKENS) + "\n"


@pytest.mark.parametrize("drop", ["close", "half", "chunked"])
def test_resumes_after_dropped_connections_without_repeat_or_loss(fake: Fake, drop: str) -> None:
    fake.drop = drop
    fake.cuts = [4, 3, None]
    result = cli("chat", "hi there", "--url", fake.url)
    assert result.code == 0, result.err
    assert result.out == EXPECTED_TEXT
    assert result.err.count("resuming in") == 2
    first, second, third = fake.seen
    assert (first.path, first.query) == ("/chat", {"prompt": ["hi there"]})
    assert "last-event-id" not in first.headers
    assert second.path == third.path == f"/chat/{JOB}/events"
    assert second.headers["last-event-id"] == SCRIPT[3][0]
    assert third.headers["last-event-id"] == SCRIPT[6][0]


def test_json_output_survives_a_drop_with_each_event_once(fake: Fake) -> None:
    fake.cuts = [5, None]
    result = cli("--json", "chat", "hi", "--url", fake.url)
    assert result.code == 0, result.err
    assert [(line["id"], line["data"]) for line in json_lines(result.out)] == SCRIPT


def test_a_drop_before_any_event_sends_the_original_request_again(fake: Fake) -> None:
    fake.cuts = [0, None]
    result = cli("chat", "hi", "--session", "s1", "--role", "pirate", "--url", fake.url)
    assert result.code == 0, result.err
    assert result.out == EXPECTED_TEXT
    assert [seen.path for seen in fake.seen] == ["/chat", "/chat"]
    expected = {"prompt": ["hi"], "session": ["s1"], "role": ["pirate"]}
    assert all(seen.query == expected for seen in fake.seen)


BUSY = f"session s1 is still answering job {JOB}; wait for its final event"


@pytest.mark.parametrize(
    "body",
    [{"error": BUSY}, {"error": "session s1 is busy", "job_id": JOB}],
    ids=["id-in-message", "job_id-key"],
)
def test_a_409_after_a_drop_before_any_event_follows_the_job_it_names(
    fake: Fake, body: dict[str, Any]
) -> None:
    fake.cuts = [0, None, None]
    fake.statuses = [200, 409, 200]
    fake.error = body
    result = cli("chat", "hi", "--session", "s1", "--url", fake.url)
    assert result.code == 0, result.err
    assert result.out == EXPECTED_TEXT
    assert [seen.path for seen in fake.seen] == ["/chat", "/chat", f"/chat/{JOB}/events"]
    assert "last-event-id" not in fake.seen[2].headers  # from the start: nothing shown yet
    assert result.err.count("resuming in") == 1
    assert f"following job {JOB}" in result.err


def test_a_gateway_restarting_when_the_request_is_sent_again_is_retried(fake: Fake) -> None:
    fake.cuts = [0, None, None]
    fake.statuses = [200, 503, 200]
    result = cli("chat", "hi", "--url", fake.url)
    assert result.code == 0, result.err
    assert result.out == EXPECTED_TEXT
    assert [seen.path for seen in fake.seen] == ["/chat"] * 3
    assert "the gateway answered 503" in result.err


def test_a_409_on_the_first_request_is_an_error(fake: Fake) -> None:
    # The job it names is not ours: we have not started one.
    fake.statuses = [409]
    fake.error = {"error": BUSY, "job_id": JOB}
    result = cli("chat", "hi", "--session", "s1", "--url", fake.url)
    assert (result.code, result.out, result.err) == (2, "", f"error: {BUSY}\n")
    assert [seen.path for seen in fake.seen] == ["/chat"]


@pytest.mark.parametrize(
    "lost",
    [httpx.ConnectTimeout("timed out"), httpx.RemoteProtocolError("reset by a proxy")],
    ids=["connect-timed-out", "reset-after-sending"],
)
def test_a_409_after_a_request_not_answered_200_is_not_followed(lost: Exception) -> None:
    # Without a 200 nothing says the gateway saw our request (a proxy may have reset it):
    # the job the 409 names may be another client's on the same session, not ours to show
    # (or to cancel on Ctrl-C).
    answers: list[httpx.Response | Exception] = [
        lost,
        httpx.Response(409, json={"error": BUSY, "job_id": JOB}),
    ]

    def gateway(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    transport = httpx.MockTransport(gateway)
    with httpx.Client(transport=transport, base_url="http://gateway") as client:
        stream = EventStream(client, "/chat", {"prompt": "hi"}, sleep=lambda _: None)
        with pytest.raises(GatewayError) as refused:
            list(stream)
    assert refused.value.status == 409 and stream.job_id is None and answers == []


def test_a_prompt_that_is_not_utf8_is_an_error_and_sends_nothing(fake: Fake) -> None:
    result = cli("chat", "x\udc9by", "--url", fake.url)  # the bytes x 0x9b y, from a shell
    assert (result.code, result.err) == (2, "error: the prompt is not valid UTF-8 text\n")
    assert fake.seen == []


def test_tool_calls_get_lines_of_their_own_and_unknown_events_are_ignored(fake: Fake) -> None:
    calls = [
        {
            "id": "c1",
            "name": "calculator",
            "arguments": {"expression": "2+3*4"},
            "output": "14",
        },
        {"id": "c2", "name": "current_time", "arguments": "{bad", "output": "error: bad JSON"},
    ]
    fake.events = scripted(
        {"lifecycle": "queued", "job_id": JOB, "position": 1},
        {"lifecycle": "thinking", "job_id": JOB},
        {"token": "Let me check."},
        {"tool_call": {"id": "c1", "name": "calculator"}},
        {"mystery": {"x": 1}},
        {"tools_called": calls},
        {"token": "It is 14."},
        {"lifecycle": "done", "extra": True},
    )
    result = cli("chat", "what is 2 + 3 * 4?", "--url", fake.url)
    assert result.code == 0, result.err
    assert result.out == (
        "Let me check.\n"
        "⚙ calling calculator…\n"
        '⚙ calculator {"expression": "2+3*4"} → 14\n'
        "⚙ current_time {bad → error: bad JSON\n"
        "It is 14.\n"
    )


HOSTILE = scripted(
    {"lifecycle": "queued", "job_id": JOB, "position": 1},
    {"token": "Hi\x1b]0;pwned\x07 there"},
    {"token": "\r\x1b[2J\x00\x9b!\n\tok"},
    {"tool_call": {"id": "c1", "name": "calc\x1b[8m"}},
    {"tools_called": [{"id": "c1", "name": "calc", "arguments": "{\x1b[2J", "output": "1\r\x7f"}]},
    {"error": "boom\x1b]0;x\x07"},
)


def test_on_a_terminal_control_characters_are_shown_not_obeyed(fake: Fake) -> None:
    # A model or tool must not retitle, clear or rewrite the terminal; newline and tab pass.
    fake.events = HOSTILE
    result = cli_on_terminal("chat", "hi", "--url", fake.url)
    assert result.code == 1
    assert result.out == (
        "Hi\\x1b]0;pwned\\x07 there\\x0d\\x1b[2J\\x00\\x9b!\n\tok\n"
        "⚙ calling calc\\x1b[8m…\n"
        "⚙ calc {\\x1b[2J → 1\\x0d\\x7f\n"
        "error: boom\\x1b]0;x\\x07\n"
    )


def test_through_a_pipe_the_text_stays_exact(fake: Fake) -> None:
    fake.events = HOSTILE
    result = cli("chat", "hi", "--url", fake.url)
    assert result.code == 1
    assert result.out == (
        "Hi\x1b]0;pwned\x07 there\r\x1b[2J\x00\x9b!\n\tok\n"
        "⚙ calling calc\x1b[8m…\n"
        "⚙ calc {\x1b[2J → 1\r\x7f\n"
    )
    assert result.err == "error: boom\x1b]0;x\x07\n"


def test_api_key_and_url_come_from_the_environment(fake: Fake) -> None:
    result = cli("chat", "hi", env={"STREAMGATE_URL": fake.url, "STREAMGATE_API_KEY": "k-123"})
    assert result.code == 0, result.err
    assert fake.seen[0].headers["authorization"] == "Bearer k-123"
    explicit = cli("chat", "hi", "--url", fake.url, "--api-key", "other")
    assert explicit.code == 0, explicit.err
    assert fake.seen[1].headers["authorization"] == "Bearer other"


def _stream(
    fake: Fake, retries: int = 8, read_s: float = 5.0
) -> tuple[EventStream, list[str], list[float]]:
    """An in-process EventStream on the fake, recording its messages and (skipped) sleeps."""
    messages: list[str] = []
    slept: list[float] = []
    client = httpx.Client(base_url=fake.url, timeout=httpx.Timeout(5.0, read=read_s))
    stream = EventStream(
        client,
        "/chat",
        {"prompt": "hi"},
        retries=retries,
        on_retry=messages.append,
        sleep=slept.append,
    )
    return stream, messages, slept


def _ids(events: list[Event]) -> list[str | None]:
    return [event.id for event in events]


def test_a_read_timeout_counts_as_a_drop(fake: Fake) -> None:
    fake.drop = "stall"
    fake.cuts = [3, None]
    stream, messages, _ = _stream(fake, read_s=0.3)
    with stream.client:
        events = list(stream)
    assert _ids(events) == [event_id for event_id, _ in SCRIPT]
    assert len(messages) == 1 and "timed out" in messages[0]


def test_a_gateway_restarting_on_resume_is_retried(fake: Fake) -> None:
    fake.cuts = [3, None, None]
    fake.statuses = [200, 503, 200]
    stream, messages, _ = _stream(fake)
    with stream.client:
        events = list(stream)
    assert [event.data for event in events] == [data for _, data in SCRIPT]
    assert len(messages) == 2
    assert "the gateway answered 503" in messages[1]


def test_retries_are_bounded_with_backoff(fake: Fake) -> None:
    fake.cuts = [2, 0, 0, 0, 0]
    stream, messages, slept = _stream(fake, retries=3)
    with stream.client, pytest.raises(ConnectionLost, match="after 3 attempts"):
        list(stream)
    assert slept == [0.5, 1.0, 2.0]
    assert len(messages) == 3
