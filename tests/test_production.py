"""What an operator relies on: metrics, logs, API keys, rate and queue limits."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from . import sse
from .harness import RedisServer, Service, Stack


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def worker_metrics_url(worker: Service) -> str:
    return f"http://127.0.0.1:{worker.env['METRICS_PORT']}/metrics"


def test_metrics_change_across_a_chat(stack: Stack, client: httpx.Client) -> None:
    gateway_url = stack.gateway.url + "/metrics"
    worker_url = worker_metrics_url(stack.workers[0])
    before, worker_before = scrape(gateway_url), scrape(worker_url)
    stream = sse.read(
        client, stack.gateway.url + "/chat", params={"prompt": "calculate 2 + 2 [long 20]"}
    )
    assert sse.is_done(stream.events[-1])
    after, worker_after = scrape(gateway_url), scrape(worker_url)
    tokens = sum("token" in e for e in stream.events)
    labels = {"route": "/chat", "method": "GET", "status": "200"}
    assert (
        value(after, "streamgate_http_requests_total", **labels)
        == value(before, "streamgate_http_requests_total", **labels) + 1
    )
    assert (
        value(after, "streamgate_tokens_relayed_total")
        >= value(before, "streamgate_tokens_relayed_total") + tokens
    )
    for name in (
        "streamgate_time_to_first_token_seconds_count",
        "streamgate_time_to_final_event_seconds_count",
    ):
        assert value(after, name) == value(before, name) + 1
    assert value(after, "streamgate_open_streams") == 0
    assert "streamgate_queue_depth" in {name for name, _ in after}
    assert (
        value(worker_after, "streamgate_jobs_total", outcome="done")
        == value(worker_before, "streamgate_jobs_total", outcome="done") + 1
    )
    assert (
        value(worker_after, "streamgate_tool_calls_total", tool="calculator", outcome="ok")
        == value(worker_before, "streamgate_tool_calls_total", tool="calculator", outcome="ok") + 1
    )
    assert (
        value(worker_after, "streamgate_upstream_first_token_seconds_count")
        >= value(worker_before, "streamgate_upstream_first_token_seconds_count") + 2
    )


def test_upstream_errors_are_counted_by_kind(stack: Stack, client: httpx.Client) -> None:
    url = worker_metrics_url(stack.workers[0])
    before = value(scrape(url), "streamgate_upstream_errors_total", kind="rate_limit")
    sse.read(client, stack.gateway.url + "/chat", params={"prompt": "[http 429]"})
    assert value(scrape(url), "streamgate_upstream_errors_total", kind="rate_limit") == before + 1


def test_the_metrics_of_two_workers_add_up(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(workers=2)
    jobs = [
        client.post(stack.gateway.url + "/chat", json={"prompt": "[long 30] [delay 0.01]"}).json()[
            "job_id"
        ]
        for _ in range(8)
    ]
    for job_id in jobs:
        sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events")
    per_worker = [
        value(scrape(worker_metrics_url(w)), "streamgate_jobs_total", outcome="done")
        for w in stack.workers
    ]
    assert sum(per_worker) == 8


def test_logs_are_json_with_the_job_id_and_no_prompt(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack()
    secret = "zebra-secret-prompt-7"
    stream = sse.read(client, stack.gateway.url + "/chat", params={"prompt": secret})
    job_id = stream.events[0]["job_id"]
    time.sleep(0.3)
    for service in (stack.workers[0], stack.gateway):
        log = service.log()
        assert secret not in log
        lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    about_job = [json.loads(line) for line in stack.workers[0].log().splitlines() if job_id in line]
    assert about_job and all(line.get("job_id") == job_id for line in about_job)


@pytest.fixture
def keyed(make_stack: Callable[..., Stack], tmp_path: Path) -> Stack:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# one key a line\nkey-three\n")
    return make_stack(API_KEYS="key-one,key-two", API_KEYS_FILE=str(keys_file))


def test_api_keys(keyed: Stack, client: httpx.Client) -> None:
    url = keyed.gateway.url
    assert client.get(url + "/healthz").status_code == 200
    missing = client.get(url + "/chat", params={"prompt": "hi"})
    assert missing.status_code == 401 and "API key" in missing.json()["error"]
    assert missing.headers["www-authenticate"].startswith("Bearer")  # RFC 9110: 401 names it
    wrong = client.post(
        url + "/chat", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401
    one = {"Authorization": "Bearer key-one"}
    created = client.post(url + "/chat", json={"prompt": "[long 5]"}, headers=one)
    assert created.status_code == 202
    events_url = url + created.json()["events_url"]
    assert sse.is_done(sse.read(client, events_url, headers=one).events[-1])
    by_query = sse.read(client, events_url, params={"access_token": "key-one"})
    assert sse.is_done(by_query.events[-1])
    # Repeated, the first value counts, as for every parameter.
    first_wrong = client.get(
        events_url, params=[("access_token", "nope"), ("access_token", "key-one")]
    )
    assert first_wrong.status_code == 401
    first_right = [("access_token", "key-one"), ("access_token", "nope")]
    assert sse.is_done(sse.read(client, events_url, params=first_right).events[-1])
    # Another key (one from the file) does not see the job at all.
    three = {"Authorization": "Bearer key-three"}
    assert client.get(events_url, headers=three).status_code == 404
    job_id = created.json()["job_id"]
    assert client.delete(f"{url}/chat/{job_id}", headers=three).status_code == 404
    stream = sse.read(client, url + "/chat", params={"prompt": "hi", "access_token": "key-three"})
    assert sse.is_done(stream.events[-1])
    assert client.get(url + "/roles", headers=one).status_code == 200


def test_the_openai_api_takes_the_same_keys_and_keeps_jobs_apart(keyed: Stack) -> None:
    base = keyed.gateway.url + "/v1"
    with openai.OpenAI(base_url=base, api_key="nope", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.models.list()
        assert refused.value.code == "invalid_api_key"
    with (
        openai.OpenAI(base_url=base, api_key="key-one", max_retries=0) as one,
        openai.OpenAI(base_url=base, api_key="key-three", max_retries=0) as three,
    ):
        asked = [{"role": "user", "content": "[long 2]"}]
        answer = one.chat.completions.create(model="assistant", messages=asked)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "t0 t1 "
        response = one.responses.create(model="assistant", input="[long 2]")
        assert one.responses.retrieve(response.id).output_text == "t0 t1 "
        with pytest.raises(openai.NotFoundError):
            three.responses.retrieve(response.id)
        with pytest.raises(openai.NotFoundError):
            three.responses.cancel(response.id)
        with pytest.raises(openai.NotFoundError):
            three.responses.create(
                model="assistant", input="go on", previous_response_id=response.id
            )


def test_rate_limit_holds_across_two_gateways(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(gateways=2, RATE_LIMIT_PER_MIN="3")
    first, second = stack.gateways
    for gateway in (first, second, first):
        assert client.post(gateway.url + "/chat", json={"prompt": "hi"}).status_code == 202
    refused = client.post(second.url + "/chat", json={"prompt": "hi"})
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "RATE_LIMIT_PER_MIN" in refused.json()["error"]
    assert client.get(first.url + "/chat", params={"prompt": "hi"}).status_code == 429


def test_queue_cap(make_stack: Callable[..., Stack], client: httpx.Client) -> None:
    stack = make_stack(workers=0, MAX_QUEUED_JOBS="2")
    for _ in range(2):
        assert client.post(stack.gateway.url + "/chat", json={"prompt": "hi"}).status_code == 202
    full = client.post(stack.gateway.url + "/chat", json={"prompt": "hi"})
    assert full.status_code == 503
    assert full.headers["retry-after"]
    assert "MAX_QUEUED_JOBS" in full.json()["error"]


def test_a_cancelled_queued_job_frees_its_place_at_once(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    """The cap counts jobs that may still run: one cancelled while it waits (DELETE) is out
    of the count at once, not after QUEUE_TIMEOUT_S."""
    stack = make_stack(workers=0, MAX_QUEUED_JOBS="2", QUEUE_TIMEOUT_S="60")
    url = stack.gateway.url + "/chat"
    waiting = [client.post(url, json={"prompt": "hi"}).json()["job_id"] for _ in range(2)]
    assert client.post(url, json={"prompt": "hi"}).status_code == 503
    for job_id in waiting:
        assert client.delete(f"{url}/{job_id}").status_code == 204
    again = client.post(url, json={"prompt": "hi"})
    assert again.status_code == 202, again.text
    queued = sse.read(client, stack.gateway.url + again.json()["events_url"], stop_after=1)
    assert queued.events[0]["position"] == 1  # first in line: the cancelled ones are gone


def test_open_streams_per_key_cap(make_stack: Callable[..., Stack], client: httpx.Client) -> None:
    stack = make_stack(MAX_STREAMS_PER_KEY="1")
    job_id = client.post(
        stack.gateway.url + "/chat", json={"prompt": "[long 60] [delay 0.05]"}
    ).json()["job_id"]
    events_url = f"{stack.gateway.url}/chat/{job_id}/events"
    with client.stream("GET", events_url) as open_one:
        assert open_one.status_code == 200
        chunks = open_one.iter_raw()  # kept: a dropped iterator closes the connection
        next(chunks)
        second = client.get(events_url)
        assert second.status_code == 429
        assert "MAX_STREAMS_PER_KEY" in second.json()["error"]
    time.sleep(0.3)
    assert sse.is_done(sse.read(client, events_url).events[-1])


def test_refused_chats_do_not_use_up_the_rate_limit(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(RATE_LIMIT_PER_MIN="2")
    url = stack.gateway.url + "/chat"
    assert (
        client.post(url, json={"prompt": "[long 40] [delay 0.05]", "session": "s"}).status_code
        == 202
    )
    for _ in range(3):  # the session is busy: 409, not counted
        assert client.post(url, json={"prompt": "hi", "session": "s"}).status_code == 409
    assert client.post(url, json={"prompt": "hi"}).status_code == 202
    assert client.post(url, json={"prompt": "hi"}).status_code == 429


def test_a_full_redis_answers_503(
    make_stack: Callable[..., Stack],
    client: httpx.Client,
    redis_client: redis.Redis,
    redis_server: RedisServer | None,
) -> None:
    if redis_server is None:
        pytest.skip("changes maxmemory: only on a Redis the tests started themselves")
    stack = make_stack()
    used = int(redis_client.info("memory")["used_memory"])
    old = redis_client.config_get("maxmemory")["maxmemory"]
    redis_client.config_set("maxmemory", str(used // 2))
    try:
        response = client.post(stack.gateway.url + "/chat", json={"prompt": "hi"})
        assert response.status_code == 503
        assert "out of memory" in response.json()["error"]
        assert response.headers["retry-after"]
    finally:
        redis_client.config_set("maxmemory", old)
