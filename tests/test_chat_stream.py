"""GET /chat end to end: real gateway, worker and demo LLM processes, a real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from shared import keys

from . import sse
from .harness import Stack, private_db

HARD_TEXT = (
    "Hard cases:\ndata: not an event\r\r\n\n\nid: 7: a comment?event: nope emoji 😀🎉👩‍👩‍👧"
    ' 日本語 Ünïcödé \u2028line-separator\u2029 "quotes" \\ backslash\ttab\x00nul end.'
)


def chat(client: httpx.Client, stack: Stack, prompt: str, **kw: object) -> sse.Stream:
    return sse.read(client, stack.gateway.url + "/chat", params={"prompt": prompt}, **kw)  # type: ignore[arg-type]


def assert_well_formed(stream: sse.Stream) -> None:
    assert stream.status == 200
    assert len(stream.finals) == 1, stream.events
    assert sse.is_final(stream.events[-1])
    assert stream.after_final == b""
    ids = [m.id for m in stream.messages]
    assert len(set(ids)) == len(ids)
    job_id = stream.events[0]["job_id"]
    assert all(i.startswith(job_id) for i in ids)


def test_streams_the_demo_answer(stack: Stack, client: httpx.Client) -> None:
    stream = chat(client, stack, "hello")
    assert_well_formed(stream)
    assert stream.events[0]["lifecycle"] == "queued"
    assert stream.events[0]["position"] >= 1
    assert stream.events[1] == {"lifecycle": "started", "job_id": stream.events[0]["job_id"]}
    assert sse.is_done(stream.events[-1])
    assert "Streamgate demo model" in stream.text
    assert '"hello"' in stream.text
    assert all(e["token"] for e in stream.events if "token" in e), "empty tokens are not sent"


def test_hard_tokens_arrive_exactly(stack: Stack, client: httpx.Client) -> None:
    stream = chat(client, stack, "[hard]")
    assert_well_formed(stream)
    assert stream.text == HARD_TEXT
    assert sse.is_done(stream.events[-1])


def test_long_answer_loses_nothing(stack: Stack, client: httpx.Client) -> None:
    stream = chat(client, stack, "[long 3000] [delay 0]")
    assert_well_formed(stream)
    assert stream.text == "".join(f"t{i} " for i in range(3000))


def test_headers_say_do_not_cache_or_buffer(stack: Stack, client: httpx.Client) -> None:
    stream = chat(client, stack, "hello")
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert "no-cache" in stream.headers["cache-control"]
    assert stream.headers["x-accel-buffering"] == "no"
    # A client that asks to close gets one Connection header, the server's: no keep-alive
    # beside it (a hop-by-hop header sse-starlette set).
    closing = sse.read(
        client,
        stack.gateway.url + "/chat",
        params={"prompt": "hi"},
        headers={"Connection": "close"},
    )
    assert closing.headers.get_list("connection") == ["close"], closing.headers


def test_pings_while_waiting_and_never_after_the_end(stack: Stack, client: httpx.Client) -> None:
    # PING_INTERVAL_S is 1 in the test stack; tokens 1.3 s apart leave room for pings.
    stream = chat(client, stack, "[long 3] [delay 1.3]")
    assert_well_formed(stream)
    assert stream.comments and set(stream.comments) == {"ping"}
    last_line = stream.raw.removesuffix(b"\n\n").rsplit(b"\n", 1)[1]
    assert last_line.startswith(b'data: {"lifecycle":"done"') and last_line.endswith(b"}")


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ("[http 401]", "API key"),
        ("[http 429]", "rate limiting"),
        ("[http 500]", "HTTP 500"),
        ("[fail-mid]", "lost mid-answer"),
        ("[error-mid]", "error mid-answer"),
        ("[stall]", "sent nothing for 2 s"),
        ("[cut]", "ended without [DONE] or a finish reason"),
    ],
)
def test_upstream_failures_end_with_one_error_event(
    stack: Stack, client: httpx.Client, prompt: str, words: str
) -> None:
    stream = chat(client, stack, prompt)
    assert_well_formed(stream)
    assert words in stream.events[-1]["error"]


def test_an_answer_whose_connection_drops_after_its_finish_reason_is_whole(
    stack: Stack, client: httpx.Client
) -> None:
    """Complete, by the contract's test: it has a finish reason (only [DONE] and the usage
    after it were lost)."""
    stream = chat(client, stack, "[drop-end]")
    assert_well_formed(stream)
    done = stream.events[-1]
    assert done["lifecycle"] == "done" and done["finish_reason"] == "stop", done
    assert "usage" not in done and stream.text


def test_done_carries_the_finish_reason_and_the_upstreams_usage(
    stack: Stack, client: httpx.Client
) -> None:
    done = chat(client, stack, "[long 4]").events[-1]
    assert done["lifecycle"] == "done" and done["finish_reason"] == "stop"
    usage = done["usage"]
    assert usage["completion_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4 and usage["prompt_tokens"] > 0


@pytest.mark.parametrize("prompt", ["[http 500]", "[http 401]", "[error-mid]"])
def test_upstream_error_bodies_stay_in_the_log(
    stack: Stack, client: httpx.Client, prompt: str
) -> None:
    stream = chat(client, stack, prompt)
    error = stream.events[-1]["error"]
    assert "demo error" not in error and "said" not in error, error
    job_id = stream.events[0]["job_id"]
    log = stack.workers[0].log()
    assert any(job_id in line and "said" in line for line in log.splitlines())


def test_unreachable_upstream_is_an_error_event(make_stack, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    stream = chat(client, stack, "hello")
    assert_well_formed(stream)
    assert stream.events[-1]["error"] == "could not reach the LLM"
    assert "at http://127.0.0.1:9/v1; check OPENAI_BASE_URL" in stack.workers[0].log()
    # The operator's detail reaches users only when asked for.
    stack.workers.pop().stop()
    stack.add_worker(EXPOSE_ERROR_DETAILS="true")
    detailed = chat(client, stack, "hello")
    assert "could not reach the LLM (at http://127.0.0.1:9/v1" in detailed.events[-1]["error"]


@pytest.fixture(scope="module")
def small_prompts(redis_url: str, logdir: Path) -> Iterator[Stack]:
    stack = Stack(private_db(redis_url), logdir, {"MAX_PROMPT_CHARS": "32"}).start()
    yield stack
    stack.stop()


def _queue_size(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.zcard(keys.QUEUE_NAME)) + int(client.zcard(keys.PENDING))
    finally:
        client.close()


@pytest.mark.parametrize(
    ("query", "status", "words"),
    [
        ("", 400, "missing prompt"),
        ("prompt=", 400, "empty"),
        ("prompt=%20%20", 400, "empty"),
        ("prompt=%ff%fe", 400, "UTF-8"),
        ("prompt=abc%zz", 400, "percent"),
        ("prompt=abc%4", 400, "percent"),
        ("prompt=" + "x" * 40, 413, "limit is 32"),
        ("prompt=hi&last_event_id=nonsense", 400, "cursor"),
        ("prompt=hi&last_event_id=" + "a" * 32 + "_1-0", 404, "no job"),
        ("prompt=hi&session=../etc", 400, "session"),
    ],
)
def test_bad_requests_get_json_errors_and_enqueue_nothing(
    small_prompts: Stack, client: httpx.Client, query: str, status: int, words: str
) -> None:
    stack = small_prompts
    before = _queue_size(stack.redis_url)
    response = client.get(stack.gateway.url + "/chat?" + query)
    assert response.status_code == status
    assert words in response.json()["error"]
    assert _queue_size(stack.redis_url) == before


def test_head_answers_headers_and_enqueues_nothing(stack: Stack, client: httpx.Client) -> None:
    before = _queue_size(stack.redis_url)
    started = time.monotonic()
    response = client.head(stack.gateway.url + "/chat", params={"prompt": "hello"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert time.monotonic() - started < 2
    assert _queue_size(stack.redis_url) == before


def test_cors_allows_configured_origins(make_stack, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(CORS_ALLOW_ORIGINS="https://app.example")
    preflight = client.options(
        stack.gateway.url + "/chat",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    # What a browser client of the OpenAI API sends (the official SDK's own headers).
    asked = "authorization,content-type,x-stainless-os,x-stainless-retry-count,traceparent"
    openai = client.options(
        stack.gateway.url + "/v1/chat/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked,
        },
    )
    assert openai.status_code == 200, openai.text
    allowed = openai.headers["access-control-allow-headers"].lower().replace(" ", "")
    assert set(asked.split(",")) <= set(allowed.split(","))
    refused = client.options(
        stack.gateway.url + "/chat",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert refused.status_code == 400
    assert "origin" in refused.json()["error"]  # JSON, like every request error
    assert refused.headers["vary"].startswith("Origin")  # Starlette's headers kept
    simple = client.get(stack.gateway.url + "/healthz", headers={"Origin": "https://app.example"})
    assert simple.headers["access-control-allow-origin"] == "https://app.example"


def test_cors_star_by_default(stack: Stack, client: httpx.Client) -> None:
    response = client.get(stack.gateway.url + "/healthz", headers={"Origin": "https://x.example"})
    assert response.headers["access-control-allow-origin"] == "*"


def test_stream_expires_after_retention(make_stack, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(STREAM_RETENTION_S="2")
    stream = chat(client, stack, "hello")
    assert_well_formed(stream)
    job_id = stream.events[0]["job_id"]
    r = redis.Redis.from_url(stack.redis_url)
    ttl = r.ttl(keys.events_key(job_id))
    r.close()
    assert 0 < ttl <= 2
    events_url = f"{stack.gateway.url}/chat/{job_id}/events"
    assert (
        client.get(events_url, headers={"Accept": "text/event-stream"}, timeout=5).status_code
        == 200
    )
    time.sleep(2.5)
    assert client.get(events_url).status_code == 404


def test_gathered_tokens_arrive_merged_exact_and_the_first_at_once(  # type: ignore[no-untyped-def]
    make_stack, client: httpx.Client
) -> None:
    """TOKEN_GATHER_MS and RELAY_GATHER_MS: later tokens travel several to an event, the
    text is the same, and the first token is not held back."""
    stack = make_stack(TOKEN_GATHER_MS="200", RELAY_GATHER_MS="20", GATHER_FROM_STREAMS="0")
    prompt = {"prompt": "[long 40] [delay 0.05]"}  # t1 comes 50 ms after t0
    stream = sse.read(client, stack.gateway.url + "/chat", params=prompt)
    assert sse.ends_done(stream), stream.events
    assert stream.text == "".join(f"t{i} " for i in range(40))
    tokens = [e["token"] for e in stream.events if "token" in e]
    assert tokens[0] == "t0 "  # sent as it came
    assert len(tokens) <= 20, f"{len(tokens)} token events for 40 tokens: nothing gathered"
