"""Following a job to its end, and the exit status that tells a script how it ended.

Exit statuses: 0 the job is done (or had already ended), 1 the job ended with an error
event, 2 the request failed before or outside the stream (bad input, HTTP error, gateway
unreachable, connection lost for good), 130 interrupted. Ctrl-C during ``chat`` cancels
the job, since nobody will read its answer; ``events`` only stops following, because the
job may be somebody else's.
"""

from __future__ import annotations

from typing import TextIO

import httpx

from .client import Event, EventStream
from .render import Renderer, shown

EXIT_DONE = 0
EXIT_JOB_FAILED = 1
EXIT_REQUEST_FAILED = 2
EXIT_INTERRUPTED = 130

CANCEL_TIMEOUT_S = 5.0


def follow(stream: EventStream, renderer: Renderer, stderr: TextIO) -> int:
    """Render every event until the final one; the exit status."""
    last: Event | None = None
    for event in stream:
        renderer.event(event)
        last = event
    if last is not None and "error" in last.data:
        renderer.end_line()
        # The error may quote the upstream or a tool: not to drive the terminal either.
        message = str(last.data["error"])
        print(f"error: {shown(message) if stderr.isatty() else message}", file=stderr)
        return EXIT_JOB_FAILED
    if last is None or last.is_final:
        return EXIT_DONE  # done, or a 204 for a cursor that was already the final event
    renderer.end_line()
    print("error: the job has ended, but its final event never arrived", file=stderr)
    return EXIT_JOB_FAILED


def follow_chat(
    client: httpx.Client, stream: EventStream, renderer: Renderer, stderr: TextIO
) -> int:
    """``follow``, but Ctrl-C cancels the job (``DELETE /chat/<job_id>``) and exits 130."""
    try:
        return follow(stream, renderer, stderr)
    except KeyboardInterrupt:
        renderer.end_line()
        if stream.job_id is not None:
            cancel(client, stream.job_id, stderr)
        print("interrupted", file=stderr)
        return EXIT_INTERRUPTED


def cancel(client: httpx.Client, job_id: str, stderr: TextIO) -> None:
    try:
        response = client.delete(f"/chat/{job_id}", timeout=CANCEL_TIMEOUT_S)
    except httpx.HTTPError as exc:
        print(f"could not cancel job {job_id}: {exc}", file=stderr)
        return
    if response.status_code != 204:
        print(f"could not cancel job {job_id}: HTTP {response.status_code}", file=stderr)
    else:
        print(f"cancelled job {job_id}", file=stderr)
