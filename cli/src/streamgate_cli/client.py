"""The resuming event iterator: one job's events, in order, across dropped connections.

httpx-sse parses the wire but neither reconnects nor sends ``Last-Event-ID``; this module
does both. Decisions a reader might want to undo:

- A resume always goes to ``GET /chat/<job_id>/events`` with ``Last-Event-ID`` (the job id
  comes from the ``queued`` event). Only when no job id is known yet is the original
  request sent again; with a cursor but no job id, ``GET /chat`` resumes by the cursor alone.
- A read timeout counts as a dropped connection: the gateway pings an idle stream every
  ``PING_INTERVAL_S`` (15 s by default), so 60 s of silence means the connection is dead.
- A stream that ends without a final event was dropped too, even if it closed cleanly.
- Retries are bounded, with exponential backoff; the count starts again after each event,
  so a long answer may survive many short outages.
- Refused connections on the very first request fail at once: a wrong ``--url`` should
  say so now, not after a minute of backoff. Once connected, a refusal is a gateway restart.
- The original request sent again may meet a 409 for its session naming a running job:
  followed from its start only when the gateway had answered ours 200 (so that job is
  ours); otherwise it may be another client's, and the 409 is shown.
- httpx-sse dispatches a message for a bare ``: ping`` block once an id has been seen
  (with empty data); such messages, and any data that is not a JSON object, are skipped.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from typing import Any, NoReturn

import httpx
from httpx_sse import SSEError, connect_sse

# Connect fast; read for four missed pings at the default PING_INTERVAL_S before resuming.
TIMEOUT = httpx.Timeout(10.0, read=60.0)
RETRIES = 8
BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
RETRYABLE_STATUSES = frozenset({502, 503, 504})  # a gateway restarting behind a proxy
# The 409's wording when its body has no job_id key: "session X is still answering job <id>".
BUSY_JOB = re.compile(r"\bjob ([0-9a-f]{32})\b")
JOB_ID = re.compile(r"[0-9a-f]{32}")  # as the gateway makes them


@dataclass(frozen=True)
class Event:
    id: str | None
    data: dict[str, Any]

    @property
    def is_final(self) -> bool:
        return "error" in self.data or self.data.get("lifecycle") == "done"


class CliError(Exception):
    """Something that stops the CLI before the job could be followed to its end."""


class Unreachable(CliError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"could not reach the gateway at {url} ({reason}); is it running?")


class GatewayError(CliError):
    """The gateway answered the request with an error status, before any stream."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ConnectionLost(CliError):
    pass


class _Dropped(Exception):
    """The stream stopped before its final event; resume."""


class _Found(Exception):
    """The job a lost request started is known now: follow it at once, no retry counted."""


class EventStream:
    """Iterate over a job's events, from ``path`` and then from its events URL on resume.

    After iterating, ``ended_early`` is true when the gateway answered 204: the cursor sent
    was the job's final event, so there was nothing more to read.
    """

    def __init__(
        self,
        client: httpx.Client,
        path: str,
        params: Mapping[str, str] | None = None,
        *,
        job_id: str | None = None,
        after: str | None = None,
        retries: int = RETRIES,
        backoff_s: float = BACKOFF_S,
        on_retry: Callable[[str], None] = lambda message: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.path = path
        self.params = dict(params or {})
        self.job_id = job_id
        self.last_id = after
        self.retries = retries
        self.backoff_s = backoff_s
        self.on_retry = on_retry
        self.sleep = sleep
        self.ended_early = False
        self._connected = False
        self._sent = False
        # The gateway answered a request of ours 200 (it does once the job exists), and the
        # stream was lost before its first event: only then is the job a 409 names ours. A
        # connection dropped after sending may have been cut by a proxy before the gateway
        # saw it: the 409 may then be another client's job on the same session.
        self._started = False

    def __iter__(self) -> Iterator[Event]:
        failures = 0
        while True:
            try:
                with closing(self._read_once()) as events:
                    for event in events:
                        failures = 0
                        yield event
                        if event.is_final:
                            return
                if self.ended_early:
                    return
                reason = "the stream ended before the final event"
            except httpx.ConnectError as exc:
                if not self._connected:
                    raise Unreachable(str(self.client.base_url), _describe(exc)) from exc
                reason = f"could not reconnect: {_describe(exc)}"
            except httpx.TransportError as exc:
                reason = _describe(exc)
            except _Dropped as exc:
                reason = str(exc)
            except _Found:
                continue
            failures += 1
            if failures > self.retries:
                raise ConnectionLost(
                    f"lost the connection to {self.client.base_url} and could not resume"
                    f" after {self.retries} attempts ({reason})"
                )
            delay = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (failures - 1))
            self.on_retry(
                f"connection lost ({reason}); resuming in {delay:.1f} s"
                f" (attempt {failures} of {self.retries})"
            )
            self.sleep(delay)

    def _request(self) -> tuple[str, dict[str, str], dict[str, str]]:
        """Where to read from now: path, query and headers."""
        if self.last_id is None:
            return self.path, self.params, {}
        headers = {"Last-Event-ID": self.last_id}
        if self.job_id is None:
            return self.path, self.params, headers  # a cursor alone resumes on GET /chat too
        return f"/chat/{self.job_id}/events", {}, headers

    def _read_once(self) -> Generator[Event, None, None]:
        path, params, headers = self._request()
        # The first request's errors are the user's to see; after a lost connection (or with
        # a cursor from an earlier run) a 502-504 may be a gateway restarting.
        resuming = self._sent or self.last_id is not None
        self._sent = True
        with connect_sse(self.client, "GET", path, params=params, headers=headers) as source:
            response = source.response
            self._connected = True
            if response.status_code == 204:
                self.ended_early = True
                return
            if response.status_code in RETRYABLE_STATUSES and resuming:
                raise _Dropped(f"the gateway answered {response.status_code}")
            if response.status_code != 200:
                body = _error_body(response)
                job_id = _busy_job(body) if response.status_code == 409 else None
                if self._started and self.job_id is None and job_id is not None:
                    self._follow(job_id)
                raise GatewayError(response.status_code, _error_message(response, body))
            self._started = True
            try:
                for message in source.iter_sse():
                    data = _json_object(message.data)
                    if data is None:
                        continue
                    event = Event(message.id or None, data)
                    if event.id:
                        self.last_id = event.id
                    if self.job_id is None and isinstance(data.get("job_id"), str):
                        self.job_id = data["job_id"]
                    yield event
            except SSEError as exc:
                raise GatewayError(200, f"the gateway did not answer with events: {exc}") from exc

    def _follow(self, job_id: str) -> NoReturn:
        """Read ``job_id`` from its start from now on: the request sent again met it."""
        self.job_id = job_id
        self.path, self.params = f"/chat/{job_id}/events", {}
        self.on_retry(f"following job {job_id}, which the lost request had started")
        raise _Found


def _json_object(data: str) -> dict[str, Any] | None:
    if not data:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _error_body(response: httpx.Response) -> dict[str, Any]:
    """The error answer's JSON object, or an empty one when the body is not that."""
    try:
        return _json_object(response.read().decode()) or {}
    except UnicodeDecodeError:
        return {}


def _error_message(response: httpx.Response, body: dict[str, Any]) -> str:
    """The gateway's ``{"error": ...}`` text, or the status when the body is not that."""
    message = body.get("error")
    if isinstance(message, str) and message:
        return message
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


def _busy_job(body: dict[str, Any]) -> str | None:
    """The running job a session's 409 names: its ``job_id`` key (newer gateways), else
    the id in its message."""
    job_id = body.get("job_id")
    if isinstance(job_id, str) and JOB_ID.fullmatch(job_id):
        return job_id
    found = BUSY_JOB.search(str(body.get("error", "")))
    return found.group(1) if found else None


def _describe(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        text = f"timed out: {text}"
    return text
