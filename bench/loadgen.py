"""The SSE load generator: one process of many client streams, run by the bench.

It runs in its own process (``python -m bench.loadgen``) so that its CPU is never counted
as the servers'. A hand-written HTTP/1.1 + SSE client on ``asyncio.Protocol`` (uvloop when
present) keeps its own cost low (about 0.1 ms of CPU per paced token, mostly the socket
read; the bench reports it), so that one process can hold thousands of streams.

Protocol with the bench: one JSON spec on stdin; progress lines on stderr; ``READY ready
failed open`` on stdout once every stream reached its ``ready_on`` point; ``close`` on stdin
drops every connection at once; ``RESULT <json>`` on stdout at the end: one summary per
request, and the process's own CPU time.

Every request asks the demo LLM for ``[long N]``: tokens ``t0 t1 ... t{N-1}``, so each
stream's text can be checked for lost, duplicated and reordered tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote

import orjson

_TOKEN = re.compile(rb"t(\d+)(?:@(\d+))?")  # "@<µs>": when the demo LLM sent it ([stamp])
CONNECT_TIMEOUT_S = 10.0


def prompt_for(tokens: int, delay_s: float, tag: str, stamp: bool = False) -> str:
    """The demo LLM's directives for ``tokens`` numbered tokens, ``delay_s`` apart (each
    stamped with when the LLM sent it, if ``stamp``)."""
    return f"[long {tokens}] [delay {delay_s:f}]{' [stamp]' if stamp else ''} bench {tag}"


@dataclass
class Spec:
    port: int
    streams: int
    requests: int = 1
    tokens: int = 50
    delay_s: float = 0.02
    label: str = "c"
    host: str = "127.0.0.1"
    path: str = "/chat"
    deadline_in_s: float | None = None  # stop starting requests after this long
    ramp_per_s: float = 0.0  # 0: open every stream at once
    ready_on: str | None = None  # "started", "headers" or "token": print READY when all are
    timeout_s: float = 120.0
    record_lateness: bool = False
    stamp: bool = False  # tokens carry the LLM's send time: the relay's delay per token
    progress_s: float = 2.0


@dataclass
class Tracker:
    """What one request saw, summarised for the bench as it arrives."""

    t0: float
    delay_s: float
    status: int = 0
    headers_at: float | None = None
    first_token_at: float | None = None
    end_at: float | None = None
    final: str | None = None  # "done", "error", or None when the stream broke off
    error: str | None = None
    events: int = 0
    token_events: int = 0
    after_final: int = 0
    queued_ms: int | None = None
    started_ms: int | None = None
    job_id: str | None = None
    queued_at: float | None = None
    started_at: float | None = None
    text: list[bytes] = field(default_factory=list)
    arrivals: dict[int, float] = field(default_factory=dict)
    sent: dict[int, float] = field(default_factory=dict)  # by the demo LLM ([stamp])
    closed_by_bench: bool = False

    def on_event(self, block: bytes, now: float) -> None:
        event_id = b""
        data = None
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                data = line[6:]
            elif line.startswith(b"id: "):
                event_id = line[4:]
        if data is None:
            return  # a comment (ping)
        if self.final is not None:
            self.after_final += 1
            return
        self.events += 1
        event = orjson.loads(data)
        token = event.get("token")
        if token:
            raw = token.encode()
            self.token_events += 1
            self.text.append(raw)
            if self.first_token_at is None:
                self.first_token_at = now
            for match in _TOKEN.finditer(raw):
                i = int(match.group(1))
                self.arrivals.setdefault(i, now)
                if match.group(2):
                    self.sent.setdefault(i, int(match.group(2)) / 1e6)
        elif event.get("lifecycle") == "done":
            self.final = "done"
            self.end_at = now
        elif "error" in event:
            self.final = "error"
            self.end_at = now
            self.error = str(event["error"])[:200]
        elif event.get("lifecycle") == "queued":
            self.queued_ms = _entry_ms(event_id)
            self.queued_at = now
            self.job_id = event.get("job_id")
        elif event.get("lifecycle") == "started":
            self.started_ms = _entry_ms(event_id)
            self.started_at = now

    def summary(self, expected: int, record_lateness: bool) -> dict[str, Any]:
        """Exactness from the whole text (events may carry several tokens), timings in s.

        A token is lost when a later one arrived without it, or when the stream ended with
        ``done`` without it; a stream that broke off or ended in an error is a failed stream,
        and the tokens it never got are not counted again as lost.
        """
        words = b"".join(self.text).split()
        seen: list[int] = []
        corrupt = 0
        for word in words:
            match = _TOKEN.fullmatch(word)
            if match is None:
                corrupt += 1
            else:
                seen.append(int(match.group(1)))
        unique = set(seen)
        upto = expected if self.final == "done" else max(unique, default=-1) + 1
        lost = sum(1 for i in range(upto) if i not in unique)
        reordered = sum(1 for a, b in itertools.pairwise(seen) if b < a)
        out: dict[str, Any] = {
            "status": self.status,
            # A server that sends `done` but never ends the response fails too.
            "ok": self.final == "done" and self.status == 200 and self.error is None,
            "final": self.final,
            "error": self.error,
            "closed_by_bench": self.closed_by_bench,
            "t0": self.t0,
            "ttft": None if self.first_token_at is None else self.first_token_at - self.t0,
            "duration": None if self.end_at is None else self.end_at - self.t0,
            "tokens": len(seen),
            "events": self.events,
            "token_events": self.token_events,
            "lost": lost,
            "duplicated": len(seen) - len(unique),
            "reordered": reordered,
            "corrupt": corrupt + sum(1 for i in unique if i >= expected),
            "after_final": self.after_final,
            "queued_ms": self.queued_ms,
            "started_ms": self.started_ms,
            "job_id": self.job_id,
            "to_queued": None if self.queued_at is None else self.queued_at - self.t0,
            "to_started": None if self.started_at is None else self.started_at - self.t0,
        }
        if self.delay_s > 0 and 0 in self.arrivals:
            first = self.arrivals[0]
            late = [
                self.arrivals[i] - (first + i * self.delay_s)
                for i in range(1, expected)
                if i in self.arrivals
            ]
            gaps = [
                self.arrivals[i] - self.arrivals[i - 1] - self.delay_s
                for i in range(1, expected)
                if i in self.arrivals and i - 1 in self.arrivals
            ]
            out["late_max"] = max(late, default=0.0)
            out["gap_max"] = max(gaps, default=0.0)
            if record_lateness:
                out["late"] = [round(x, 5) for x in late]
                out["gaps"] = [round(x, 5) for x in gaps]
        if self.sent:
            # Both clocks are CLOCK_MONOTONIC of one machine: comparable across processes.
            delays = [self.arrivals[i] - sent for i, sent in self.sent.items()]
            out["delay_max"] = max(delays)
            if record_lateness:
                out["delays"] = [round(x, 5) for x in delays]
        return out


def _entry_ms(event_id: bytes) -> int | None:
    """The millisecond part of a Streamgate cursor ``<job>_<ms>-<seq>`` (Redis's clock)."""
    _, _, entry = event_id.partition(b"_")
    ms, _, _ = entry.partition(b"-")
    return int(ms) if ms.isdigit() else None


class SSEClient(asyncio.Protocol):
    """HTTP/1.1 GET of one SSE stream: head, chunked body, events split on blank lines.

    It reads until the server ends the response, so that anything sent after the final
    event is seen (and counted), and a server that never closes shows as a time-out.
    """

    def __init__(
        self,
        request: bytes,
        tracker: Tracker,
        done: asyncio.Future[None],
        ready_on: str | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.request = request
        self.tracker = tracker
        self.done = done
        self.ready_on = ready_on
        self.on_ready = on_ready
        self.transport: asyncio.Transport | None = None
        self.head: bytes | None = b""
        self.chunked = False
        self.eof = False
        self.raw = b""
        self.remaining = 0
        self.skip_crlf = False
        self.body = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they quack alike.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        tracker = self.tracker
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.head = None
            tracker.status = int(head.split(b" ", 2)[1])
            tracker.headers_at = now
            self.chunked = b"transfer-encoding: chunked" in head.lower()
            if tracker.status != 200:
                tracker.error = f"HTTP {tracker.status}: {data[:200]!r}"
                self._finish()
                return
        if self.chunked:
            data = self._dechunk(data)
        self.body += data
        while (end := self.body.find(b"\n\n")) >= 0:
            block, self.body = self.body[:end], self.body[end + 2 :]
            tracker.on_event(block, now)
        if self.on_ready is not None and (
            (self.ready_on == "headers" and tracker.headers_at is not None)
            or (self.ready_on == "started" and tracker.started_ms is not None)
            or (self.ready_on == "token" and tracker.first_token_at is not None)
        ):
            self._report_ready()
        if self.eof:
            self._finish()

    def _dechunk(self, data: bytes) -> bytes:
        self.raw += data
        out = []
        while self.raw:
            if self.remaining:
                piece = self.raw[: self.remaining]
                out.append(piece)
                self.raw = self.raw[len(piece) :]
                self.remaining -= len(piece)
                self.skip_crlf = self.remaining == 0
            elif self.skip_crlf:
                if len(self.raw) < 2:
                    break
                self.raw = self.raw[2:]
                self.skip_crlf = False
            else:
                end = self.raw.find(b"\r\n")
                if end < 0:
                    break
                size = int(self.raw[:end].split(b";", 1)[0], 16)
                self.raw = self.raw[end + 2 :]
                if size == 0:
                    self.eof = True  # the last chunk: the server ended the response
                    break
                self.remaining = size
        return b"".join(out)

    def _report_ready(self) -> None:
        if self.on_ready is not None:
            callback, self.on_ready = self.on_ready, None
            callback()

    def _finish(self) -> None:
        if self.tracker.end_at is None:
            self.tracker.end_at = time.monotonic()
        self._report_ready()
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tracker.final is None and self.tracker.error is None:
            self.tracker.error = f"connection closed: {exc or 'by the server'}"
        self._finish()

    def abort(self, by_bench: bool) -> None:
        self.tracker.closed_by_bench = by_bench
        if self.transport is not None:
            self.transport.abort()
        self._finish()


class Load:
    """The streams of one process: each runs its requests one after another."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.results: list[dict[str, Any]] = []
        self.open: dict[int, SSEClient] = {}
        self.ready = 0
        self.failed = 0
        self.done_requests = 0
        self.tokens = 0
        self.closing = False
        self.all_ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.deadline = None if spec.deadline_in_s is None else loop.time() + spec.deadline_in_s

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for n in range(self.spec.streams):
            if self.spec.ramp_per_s > 0:
                await asyncio.sleep(max(0.0, start + n / self.spec.ramp_per_s - loop.time()))
            if self.closing:
                break
            tasks.append(asyncio.create_task(self._stream(n)))
        if self.spec.ready_on is None:
            self.all_ready.set()
        await asyncio.gather(*tasks)

    async def _stream(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        for r in range(self.spec.requests):
            if self.closing or (self.deadline is not None and loop.time() >= self.deadline):
                break
            await self._request(n, r, ready=r == 0)

    async def _request(self, n: int, r: int, ready: bool) -> None:
        spec = self.spec
        loop = asyncio.get_running_loop()
        tag = f"{spec.label}-{n}-{r}"
        path = f"{spec.path}?prompt={quote(prompt_for(spec.tokens, spec.delay_s, tag, spec.stamp))}"
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {spec.host}\r\nAccept: text/event-stream\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        tracker = Tracker(time.monotonic(), spec.delay_s)
        done: asyncio.Future[None] = loop.create_future()
        on_ready = self._one_ready if ready and spec.ready_on is not None else None
        client = SSEClient(request, tracker, done, spec.ready_on, on_ready)
        key = id(client)
        self.open[key] = client
        stage = "connect"
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await loop.create_connection(lambda: client, spec.host, spec.port)
            stage = "stream"
            async with asyncio.timeout(spec.timeout_s):
                await asyncio.shield(done)
        except TimeoutError:
            if not tracker.closed_by_bench:
                tracker.error = tracker.error or (
                    f"no connection within {CONNECT_TIMEOUT_S:g} s"
                    if stage == "connect"
                    else f"no end of the stream within {spec.timeout_s:g} s"
                )
            client.abort(by_bench=tracker.closed_by_bench)
        except OSError as exc:
            if not tracker.closed_by_bench:
                tracker.error = tracker.error or f"{stage}: {type(exc).__name__}: {exc}"
            client.abort(by_bench=tracker.closed_by_bench)
        finally:
            self.open.pop(key, None)
        summary = tracker.summary(spec.tokens, spec.record_lateness)
        self.results.append(summary)
        self.done_requests += 1
        self.tokens += summary["tokens"]
        if not summary["ok"] and not summary["closed_by_bench"]:
            self.failed += 1

    def _one_ready(self) -> None:
        self.ready += 1
        if self.ready >= self.spec.streams:
            self.all_ready.set()

    def close_all(self) -> None:
        self.closing = True
        for client in list(self.open.values()):
            client.abort(by_bench=True)


async def _progress(load: Load) -> None:
    shown = None
    while True:
        await asyncio.sleep(load.spec.progress_s)
        state = (len(load.open), load.done_requests, load.failed, load.tokens)
        if state != shown:
            shown = state
            print(
                f"    [{load.spec.label}] open {state[0]}, finished {state[1]},"
                f" failed {state[2]}, tokens {state[3]}",
                file=sys.stderr,
                flush=True,
            )


async def _commands(load: Load) -> None:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"close":
            load.close_all()


async def _announce_ready(load: Load) -> None:
    await load.all_ready.wait()
    sys.stdout.write(f"READY {load.ready} {load.failed} {len(load.open)}\n")
    sys.stdout.flush()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main_async(spec: Spec) -> None:
    cpu_at_start = _cpu_s()  # what the load costs, without the interpreter's start-up
    load = Load(spec)
    helpers = [asyncio.create_task(_progress(load)), asyncio.create_task(_commands(load))]
    if spec.ready_on is not None:
        helpers.append(asyncio.create_task(_announce_ready(load)))
    try:
        await load.run()
        await asyncio.sleep(0)
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    if spec.ready_on is not None and not load.all_ready.is_set():
        sys.stdout.write(f"READY {load.ready} {load.failed} 0\n")
    result = {"cpu_s": _cpu_s() - cpu_at_start, "requests": load.results}
    sys.stdout.write("RESULT ")
    sys.stdout.write(orjson.dumps(result).decode())
    sys.stdout.write("\n")
    sys.stdout.flush()


def main() -> None:
    from .processes import raise_file_limit

    raise_file_limit()
    spec = Spec(**orjson.loads(sys.stdin.buffer.readline()))
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # plain asyncio works, at a higher cost per token
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(main_async(spec))


if __name__ == "__main__":
    main()
