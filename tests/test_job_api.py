"""The job API and resuming: POST /chat, the events URL, DELETE, cursors, 204 after the end."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
import redis

from shared import keys

from . import sse
from .harness import Stack, cancel_closes_the_upstream_within_a_second


def post(client: httpx.Client, stack: Stack, prompt: str) -> str:
    response = client.post(stack.gateway.url + "/chat", json={"prompt": prompt})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["events_url"] == f"/chat/{body['job_id']}/events"
    job_id: str = body["job_id"]
    return job_id


def events(client: httpx.Client, stack: Stack, job_id: str, **kw: object) -> sse.Stream:
    return sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events", **kw)  # type: ignore[arg-type]


def enqueued(stack: Stack) -> int:
    """How many jobs were ever enqueued on this stack's Redis (each has a meta key)."""
    client = redis.Redis.from_url(stack.redis_url)
    try:
        return len(list(client.scan_iter(match=keys.meta_key("*"), count=1000)))
    finally:
        client.close()


def test_post_then_read_the_events_twice(stack: Stack, client: httpx.Client) -> None:
    job_id = post(client, stack, "[long 200]")
    first = events(client, stack, job_id)
    second = events(client, stack, job_id)
    assert first.events[0] == {"lifecycle": "queued", "job_id": job_id, "position": 1}
    assert first.text == "".join(f"t{i} " for i in range(200))
    assert [m.id for m in first.messages] == [m.id for m in second.messages]
    assert sse.is_done(first.events[-1])


def test_events_url_works_before_a_worker_starts_the_job(
    make_stack,
    client: httpx.Client,  # type: ignore[no-untyped-def]
) -> None:
    stack = make_stack(workers=0)
    job_id = post(client, stack, "hello")
    stream = events(client, stack, job_id, stop_after=1)
    assert stream.events == [{"lifecycle": "queued", "job_id": job_id, "position": 1}]
    # The place in the queue is written by the enqueue script: the next job is second.
    second = post(client, stack, "hello again")
    stream = events(client, stack, second, stop_after=1)
    assert stream.events == [{"lifecycle": "queued", "job_id": second, "position": 2}]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"{}", 400, "missing prompt"),
        (b'{"prompt": 42}', 400, "string"),
        (b'{"prompt": "  "}', 400, "empty"),
        (b'{"prompt": "' + b"x" * 200_000 + b'"}', 413, "the limit is 32000"),
        (b'{"prompt": "' + b"x" * 500_000 + b'"}', 413, "body is over"),
        (b'{"prompt": "hi", "session": "a/b"}', 400, "session"),
    ],
)
def test_bad_post_bodies(
    stack: Stack, client: httpx.Client, body: bytes, status: int, words: str
) -> None:
    before = enqueued(stack)
    response = client.post(
        stack.gateway.url + "/chat", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status
    assert words in response.json()["error"]
    assert enqueued(stack) == before


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/chat/nothex/events", 404),
        ("/chat/..%2F..%2Fetc%2Fpasswd/events", 404),
        ("/chat/" + "A" * 32 + "/events", 404),
        ("/chat/" + "0" * 32 + "/events", 404),
    ],
)
def test_events_url_rejects_what_is_not_a_known_job(
    stack: Stack, client: httpx.Client, path: str, status: int
) -> None:
    response = client.get(stack.gateway.url + path)
    assert response.status_code == status
    assert response.json()["error"]


def test_delete_rejects_bad_and_unknown_ids(stack: Stack, client: httpx.Client) -> None:
    assert client.delete(stack.gateway.url + "/chat/nope").status_code == 404
    assert client.delete(stack.gateway.url + "/chat/" + "0" * 32).status_code == 404


def test_cancel_ends_the_stream_and_closes_the_upstream(stack: Stack, client: httpx.Client) -> None:
    closed_before = stack.llm_stats()["closed_early"]
    job_id = post(client, stack, "[long 1000] [delay 0.05]")
    partial = events(client, stack, job_id, stop_after=5)
    assert any("token" in e for e in partial.events)
    cancelled_at = time.monotonic()
    assert client.delete(f"{stack.gateway.url}/chat/{job_id}").status_code == 204
    stream = events(client, stack, job_id)
    assert stream.events[-1] == {"error": "cancelled"}
    assert len(stream.finals) == 1
    while stack.llm_stats()["closed_early"] == closed_before:
        assert time.monotonic() - cancelled_at < 1.0, "the upstream request is still open"
        time.sleep(0.02)
    # Cancelling a finished job changes nothing.
    assert client.delete(f"{stack.gateway.url}/chat/{job_id}").status_code == 204
    assert events(client, stack, job_id).events == stream.events


def test_a_cancel_does_not_wait_for_the_heartbeat(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    """A job the model is silent on (no token to fence) and a heartbeat 14 s apart: the
    cancel reaches the worker by itself, and the upstream request closes within the
    contract's second."""
    stack = make_stack(WORKER_LOST_TIMEOUT_S="60", DISCONNECT_GRACE_S="60")
    for _ in range(3):  # a beat may fall in the second; three in a row cannot all
        job_id = post(client, stack, "[long 10] [wait 30]")
        started = events(client, stack, job_id, stop_after=2)
        assert started.events[-1]["lifecycle"] == "started"
        cancel_closes_the_upstream_within_a_second(client, stack, job_id)


def test_resume_with_last_event_id_gets_exactly_the_rest(
    stack: Stack, client: httpx.Client
) -> None:
    requests_before = stack.llm_stats()["requests"]
    first = sse.read(
        client,
        stack.gateway.url + "/chat",
        params={"prompt": "[hard] [delay 0.05]"},
        stop_after=6,
    )
    rest = sse.read(
        client,
        stack.gateway.url + "/chat",
        params={"prompt": "[hard] [delay 0.05]"},
        headers={"Last-Event-ID": first.last_id},
    )
    assert rest.messages[0].id != first.last_id
    assert (
        first.text + rest.text
        == sse.read(client, f"{stack.gateway.url}/chat/{first.events[0]['job_id']}/events").text
    )
    assert "😀" in first.text + rest.text
    assert sse.is_done(rest.events[-1])
    assert stack.llm_stats()["requests"] == requests_before + 1


def test_a_cursor_resumes_its_job_whatever_the_prompt_says(
    stack: Stack, client: httpx.Client
) -> None:
    job_id = post(client, stack, "[long 50]")
    head = events(client, stack, job_id, stop_after=3)
    before = enqueued(stack)
    for params in ({}, {"prompt": "something else"}, {"last_event_id": head.last_id}):
        headers = {} if "last_event_id" in params else {"Last-Event-ID": head.last_id}
        rest = sse.read(client, stack.gateway.url + "/chat", params=params, headers=headers)
        assert rest.status == 200
        assert head.text + rest.text == "".join(f"t{i} " for i in range(50))
    assert enqueued(stack) == before


def test_query_cursor_on_the_events_url(stack: Stack, client: httpx.Client) -> None:
    job_id = post(client, stack, "[long 30]")
    whole = events(client, stack, job_id)
    middle = whole.messages[10].id
    rest = events(client, stack, job_id, params={"last_event_id": middle})
    assert [m.id for m in rest.messages] == [m.id for m in whole.messages[11:]]


def test_reconnecting_after_the_final_event_is_204_and_enqueues_nothing(
    stack: Stack, client: httpx.Client
) -> None:
    done = sse.read(client, stack.gateway.url + "/chat", params={"prompt": "hi"})
    before = enqueued(stack)
    for _ in range(5):  # what a browser's EventSource does after the stream closes
        again = client.get(
            stack.gateway.url + "/chat",
            params={"prompt": "hi"},
            headers={"Last-Event-ID": done.last_id},
        )
        assert again.status_code == 204
        assert again.content == b""
    job_id = done.events[0]["job_id"]
    assert events(client, stack, job_id, headers={"Last-Event-ID": done.last_id}).status == 204
    assert enqueued(stack) == before


@pytest.mark.parametrize(
    ("cursor", "status"),
    [
        ("garbage", 400),
        ("0" * 32 + "_abc", 400),
        ("0" * 32 + "_1-0", 404),
    ],
)
def test_bad_cursors(stack: Stack, client: httpx.Client, cursor: str, status: int) -> None:
    before = enqueued(stack)
    response = client.get(
        stack.gateway.url + "/chat", params={"prompt": "hi"}, headers={"Last-Event-ID": cursor}
    )
    assert response.status_code == status
    assert response.json()["error"]
    assert enqueued(stack) == before


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        (f"{2**64}-0", "not a cursor"),
        (f"1-{2**64}", "not a cursor"),
        (f"{2**64 - 1}-{2**64 - 1}", "does not point into"),  # the largest id Redis takes
    ],
)
def test_cursors_past_what_redis_can_hold_are_a_400(
    stack: Stack, client: httpx.Client, entry: str, words: str
) -> None:
    """Digits that pass the pattern but not Redis (each half of an entry id is 64 bits)."""
    job_id = post(client, stack, "[long 2]")
    cursor = f"{job_id}_{entry}"
    for url, headers in (
        (f"/chat/{job_id}/events?last_event_id={cursor}", {}),
        ("/chat?prompt=hi", {"Last-Event-ID": cursor}),
    ):
        response = client.get(stack.gateway.url + url, headers=headers)
        assert response.status_code == 400, response.text
        assert words in response.json()["error"]


@pytest.mark.parametrize(
    "entry",
    ["0-0", "\u0661-0", "1-\u0660", "{last} ", "{last}\n", " {last}"],
    ids=["start", "arabic-digit", "arabic-seq", "trailing-space", "newline", "leading-space"],
)
def test_a_cursor_that_names_no_event_of_its_job_is_a_400(
    stack: Stack, client: httpx.Client, entry: str
) -> None:
    """Only what the job's ``id:`` lines spell: not its start, nor look-alike digits (Redis
    refused those with a plain-text 500), nor one with blanks around it."""
    job_id = post(client, stack, "[long 2]")
    last = events(client, stack, job_id).last_id.split("_", 1)[1]
    cursor = f"{job_id}_{entry.format(last=last)}"
    response = client.get(
        f"{stack.gateway.url}/chat/{job_id}/events", params={"last_event_id": cursor}
    )
    assert response.status_code == 400, response.text
    assert "not a cursor" in response.json()["error"]


def test_foreign_cursors_are_refused(stack: Stack, client: httpx.Client) -> None:
    one = post(client, stack, "[long 5]")
    other = post(client, stack, "[long 5]")
    cursor = events(client, stack, one).messages[2].id
    response = client.get(
        f"{stack.gateway.url}/chat/{other}/events", headers={"Last-Event-ID": cursor}
    )
    assert response.status_code == 400
    not_in_stream = cursor.split("_")[0] + "_1-0"
    response = client.get(stack.gateway.url + "/chat", headers={"Last-Event-ID": not_in_stream})
    assert response.status_code == 400


def test_head_on_the_events_url(stack: Stack, client: httpx.Client) -> None:
    job_id = post(client, stack, "hi")
    response = client.head(f"{stack.gateway.url}/chat/{job_id}/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert client.head(f"{stack.gateway.url}/chat/{'0' * 32}/events").status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/chat", "GET, HEAD, POST"),  # two routes serve /chat
        ("GET", "/chat/{job}", "DELETE"),
        ("PUT", "/chat/{job}", "DELETE"),
        ("DELETE", "/chat/{job}/events", "GET, HEAD"),
        ("POST", "/roles", "GET, HEAD"),
    ],
)
def test_405_names_every_allowed_method(
    stack: Stack, client: httpx.Client, method: str, path: str, allow: str
) -> None:
    url = stack.gateway.url + path.format(job="0" * 32)
    response = client.request(method, url)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert method in response.json()["error"]


def test_other_paths_under_chat_are_404(stack: Stack, client: httpx.Client) -> None:
    for path in ("/chat/a/b/c", "/chat/not-a-job-id", "/chat/not-a-job-id/events"):
        for method in ("GET", "PUT", "DELETE", "TRACE"):
            response = client.request(method, stack.gateway.url + path)
            assert response.status_code == 404, (method, path)
            assert response.json()["error"]


def test_a_static_file_names_its_own_methods(stack: Stack, client: httpx.Client) -> None:
    response = client.post(stack.gateway.url + "/static/app.js")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
