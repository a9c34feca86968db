"""Traces and usage, end to end: one OTLP trace per job (gateway, queue, worker, each
upstream request, each tool call), a resumed reader's span linked to it, and token usage per
key in ``done``, the metrics and ``GET /usage``, never another key's.

The OTLP receiver is this test's own HTTP server, decoding what arrives with the SDK's
protobuf types."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import http.server
import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace as trace_api
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.testclient import TestClient

from gateway.app import create_app
from shared import tracing
from shared.settings import Settings
from worker.llm import Upstream
from worker.tools import ToolRegistry
from worker.tools.loading import builtin_tools

from . import sse
from .harness import Stack, free_port, private_db, release_db, wait_until

KEYS = ("key-a", "key-b", "key-c", "key-d", "key-e")
MODEL = "streamgate-demo"


class Receiver(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", free_port()), _Handler)
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        {
                            "service": resource.get("service.name"),
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "kind": span.kind,
                            "attributes": _attributes(span.attributes),
                            "links": [
                                (link.trace_id.hex(), link.span_id.hex()) for link in span.links
                            ],
                            "error": span.status.code == 2,
                            "events": [event.name for event in span.events],
                        }
                    )
        with self.server.lock:
            self.server.spans += spans
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


def _attributes(pairs: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for pair in pairs:
        value = pair.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            found[pair.key] = [getattr(v, v.WhichOneof("value")) for v in value.array_value.values]
        else:
            found[pair.key] = getattr(value, kind) if kind else None
    return found


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def traced(receiver: Receiver, redis_url: str, logdir: Path) -> Iterator[Stack]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "API_KEYS": ",".join(KEYS),
        "TOOLS": "calculator,current_time",
    }
    running = Stack(private_db(redis_url), logdir, env).start(gateways=2, workers=1)
    yield running
    running.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _client_trace() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def _one(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, f"{name}: {len(found)} spans in {[s['name'] for s in spans]}"
    return found[0]


def test_a_chat_with_a_tool_call_is_one_trace_joining_the_clients(
    traced: Stack, receiver: Receiver, client: httpx.Client
) -> None:
    trace_id, client_span, traceparent = _client_trace()
    prompt = '[call calculator {"expression": "98765 * 1001"}] secret-prompt-text'
    stream = sse.read(
        client,
        traced.gateway.url + "/chat",
        params={"prompt": prompt},
        headers={**_auth("key-a"), "traceparent": traceparent},
    )
    assert sse.ends_done(stream)
    names = ["streamgate.enqueue", "streamgate.queue", "streamgate.job", f"chat {MODEL}"]
    names.append("execute_tool calculator")

    def complete() -> bool:
        seen = [s["name"] for s in receiver.trace(trace_id)]
        return all(n in seen for n in names) and seen.count(f"chat {MODEL}") == 2

    wait_until(complete, 10, "the job's spans at the receiver")
    spans = receiver.trace(trace_id)
    enqueue = _one(spans, "streamgate.enqueue")
    assert enqueue["parent"] == client_span and enqueue["service"] == "streamgate-gateway"
    queue, job = _one(spans, "streamgate.queue"), _one(spans, "streamgate.job")
    assert queue["parent"] == job["parent"] == enqueue["span_id"]
    assert job["service"] == "streamgate-worker"
    assert job["attributes"]["streamgate.outcome"] == "done"
    chats = [s for s in spans if s["name"] == f"chat {MODEL}"]
    tool = _one(spans, "execute_tool calculator")
    for child in [*chats, tool]:
        assert child["parent"] == job["span_id"]
    for chat in chats:
        assert chat["attributes"]["gen_ai.operation.name"] == "chat"
        assert chat["attributes"]["gen_ai.request.model"] == MODEL
        assert chat["attributes"]["gen_ai.usage.input_tokens"] > 0
        assert chat["attributes"]["gen_ai.usage.output_tokens"] > 0
        assert chat["attributes"]["gen_ai.response.time_to_first_chunk"] >= 0
    assert chats[0]["attributes"]["gen_ai.response.finish_reasons"] == ["tool_calls"]
    assert chats[1]["attributes"]["gen_ai.response.finish_reasons"] == ["stop"]
    assert tool["attributes"]["gen_ai.tool.name"] == "calculator"
    assert tool["attributes"]["gen_ai.tool.call.id"]
    # LOG_PROMPTS is off: no prompt, answer or tool data in any span.
    shown = json.dumps(spans)
    assert "secret-prompt-text" not in shown and "98765" not in shown and "98863765" not in shown


def test_a_reader_resuming_on_another_gateway_records_a_span_linked_to_the_job(
    traced: Stack, receiver: Receiver, client: httpx.Client
) -> None:
    posted = client.post(
        traced.gateway.url + "/chat", json={"prompt": "[long 5]"}, headers=_auth("key-a")
    ).json()
    first = sse.read(
        client, traced.gateway.url + posted["events_url"], headers=_auth("key-a"), stop_after=3
    )
    trace_id, client_span, traceparent = _client_trace()
    rest = sse.read(
        client,
        traced.gateways[1].url + posted["events_url"],
        headers={
            **_auth("key-a"),
            "Last-Event-ID": first.messages[-1].id,
            "traceparent": traceparent,
        },
    )
    assert sse.ends_done(rest)
    wait_until(lambda: receiver.trace(trace_id), 10, "the resumed reader's span")
    resume = _one(receiver.trace(trace_id), "streamgate.resume")
    assert resume["parent"] == client_span
    assert resume["attributes"]["streamgate.job.id"] == posted["job_id"]
    ((linked_trace, linked_span),) = resume["links"]
    wait_until(
        lambda: "streamgate.enqueue" in {s["name"] for s in receiver.trace(linked_trace)},
        10,
        "the job's trace",
    )
    enqueue = _one(receiver.trace(linked_trace), "streamgate.enqueue")
    assert enqueue["span_id"] == linked_span
    assert enqueue["attributes"]["streamgate.job.id"] == posted["job_id"]


def test_usage_in_done_the_metrics_and_usage_endpoint_is_the_upstreams_per_key(
    traced: Stack, client: httpx.Client
) -> None:
    before = client.get(traced.gateway.url + "/usage", headers=_auth("key-a")).json()
    reported = []
    for prompt in ("one answer", "[long 4]", '[call calculator {"expression": "1+1"}]'):
        stream = sse.read(
            client, traced.gateway.url + "/chat", params={"prompt": prompt}, headers=_auth("key-a")
        )
        assert sse.ends_done(stream)
        reported.append(stream.messages[-1].data["usage"])
    after = client.get(traced.gateway.url + "/usage", headers=_auth("key-a")).json()
    (row,) = after
    (earlier,) = before or [dict.fromkeys(row, 0) | {"day": row["day"], "model": MODEL}]
    assert row["model"] == MODEL and row["unknown_jobs"] == 0
    for figure in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert row[figure] - earlier[figure] == sum(u[figure] for u in reported)
    assert row["jobs"] - earlier["jobs"] == 3
    # Another key never sees it; since= filters by day.
    assert client.get(traced.gateway.url + "/usage", headers=_auth("key-b")).json() == []
    tomorrow = client.get(
        traced.gateway.url + "/usage", params={"since": "2999-01-01"}, headers=_auth("key-a")
    )
    assert tomorrow.json() == []
    for not_a_day in ("yesterday", "2026-W49-1", "2026-02-30", "\uff12\uff10\uff12\uff16-01-01"):
        bad = client.get(
            traced.gateway.url + "/usage", params={"since": not_a_day}, headers=_auth("key-a")
        )
        assert bad.status_code == 400 and "YYYY-MM-DD" in bad.json()["error"], not_a_day
    assert client.get(traced.gateway.url + "/usage").status_code == 401
    # The worker's counters, labelled by a digest of the key, never the key.
    label = hashlib.sha256(b"key-a").hexdigest()[:12]
    metrics = httpx.get(f"http://127.0.0.1:{traced.workers[0].env['METRICS_PORT']}/metrics").text
    assert "key-a" not in metrics
    prompt_line = f'streamgate_usage_tokens_total{{key="{label}",model="{MODEL}",type="prompt"}}'
    (value,) = [line.split()[-1] for line in metrics.splitlines() if line.startswith(prompt_line)]
    assert float(value) == row["prompt_tokens"]


def test_jobs_without_reported_usage_count_apart_as_unknown(
    traced: Stack, client: httpx.Client
) -> None:
    """An upstream error, and a job cancelled mid-answer: neither reports usage."""
    failed = sse.read(
        client,
        traced.gateway.url + "/chat",
        params={"prompt": "[http 500]"},
        headers=_auth("key-c"),
    )
    assert "error" in failed.events[-1] and "usage" not in failed.events[-1]
    job = client.post(
        traced.gateway.url + "/chat",
        json={"prompt": "[long 100] [delay 0.05]"},
        headers=_auth("key-c"),
    ).json()
    sse.read(client, traced.gateway.url + job["events_url"], headers=_auth("key-c"), stop_after=3)
    client.delete(traced.gateway.url + f"/chat/{job['job_id']}", headers=_auth("key-c"))

    def rows() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = client.get(
            traced.gateway.url + "/usage", headers=_auth("key-c")
        ).json()
        return found

    wait_until(lambda: bool(rows()) and rows()[0]["unknown_jobs"] == 2, 10, "both counted")
    (row,) = rows()
    assert row["jobs"] == 0 and row["total_tokens"] == 0


def test_a_job_failing_once_its_requests_ended_counts_what_they_reported(
    traced: Stack, receiver: Receiver, client: httpx.Client
) -> None:
    """At the tool-round limit every upstream request has ended and reported its usage: the
    job fails, but what it spent is known, and counted (the sum of its requests' spans)."""
    trace_id, _, traceparent = _client_trace()
    failed = sse.read(
        client,
        traced.gateway.url + "/chat",
        params={"prompt": "[tool-loop] calculate 1 + 1"},
        headers={**_auth("key-d"), "traceparent": traceparent},
    )
    assert "MAX_TOOL_ROUNDS" in failed.events[-1]["error"]

    def chats() -> list[dict[str, Any]]:
        return [s for s in receiver.trace(trace_id) if s["name"] == f"chat {MODEL}"]

    wait_until(lambda: len(chats()) == 5, 10, "a span per request: 4 rounds and the last call")
    prompt = sum(c["attributes"]["gen_ai.usage.input_tokens"] for c in chats())
    completion = sum(c["attributes"]["gen_ai.usage.output_tokens"] for c in chats())
    (row,) = client.get(traced.gateway.url + "/usage", headers=_auth("key-d")).json()
    assert {k: v for k, v in row.items() if k not in ("day", "model")} == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "jobs": 1,
        "unknown_jobs": 0,
    }


def test_a_job_cancelled_while_a_request_streams_counts_as_unknown(
    traced: Stack, client: httpx.Client
) -> None:
    """Its first request reported its usage, the one in flight has not: what the job spent
    is not known, so it counts apart, not as the first request's tokens alone."""
    auth = _auth("key-e")
    job = client.post(
        traced.gateway.url + "/chat",
        json={"prompt": '[call calculator {"expression": "1 + 1"}] [delay 0.1]'},
        headers=auth,
    ).json()
    raw: list[bytes] = []
    cancelled: list[int] = []

    def cancel_once_the_answer_streams(chunk: bytes) -> None:
        raw.append(chunk)
        _, called, after = b"".join(raw).partition(b'"tools_called"')
        if called and b'"token"' in after and not cancelled:
            url = f"{traced.gateway.url}/chat/{job['job_id']}"
            cancelled.append(httpx.delete(url, headers=auth).status_code)

    stream = sse.read(
        client,
        traced.gateway.url + job["events_url"],
        headers=auth,
        on_chunk=cancel_once_the_answer_streams,
    )
    assert cancelled == [204] and stream.events[-1] == {"error": "cancelled"}

    def rows() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = client.get(traced.gateway.url + "/usage", headers=auth).json()
        return found

    wait_until(lambda: bool(rows()), 10, "the job counted")
    (row,) = rows()
    assert (row["unknown_jobs"], row["jobs"], row["total_tokens"]) == (1, 0, 0), row


def test_a_chat_that_passes_over_a_dead_shard_is_still_one_enqueue_span(
    receiver: Receiver, redis_url: str, logdir: Path, client: httpx.Client
) -> None:
    """Placement tries a shard that refuses connections, then the next: one span for the
    request (the one passed over noted on it), never a span of its own in a trace of its
    own for a job that never came to be."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    live = private_db(redis_url)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    stack = Stack(live + "," + dead, logdir, env).start()
    traces: dict[str, str] = {}  # trace id -> job id
    try:

        def passed_over() -> bool:
            trace_id, _, traceparent = _client_trace()
            job = client.post(
                stack.gateway.url + "/chat",
                json={"prompt": "hi"},
                headers={"traceparent": traceparent},
            )
            traces[trace_id] = job.json()["job_id"]
            spans = [s for t in traces for s in receiver.trace(t)]
            return any("streamgate.shard_passed_over" in s["events"] for s in spans)

        wait_until(passed_over, 20, "a chat whose turn began at the dead shard")
    finally:
        stack.stop()
        release_db(live)
    for trace_id, job_id in traces.items():
        wait_until(lambda: receiver.trace(trace_id), 5, "the chat's spans")  # noqa: B023
        spans = [s for s in receiver.trace(trace_id) if s["name"] == "streamgate.enqueue"]
        assert len(spans) == 1, spans
        assert not spans[0]["error"] and spans[0]["attributes"]["streamgate.job.id"] == job_id


def test_with_log_prompts_on_spans_show_the_prompt_the_answer_and_the_calls(
    receiver: Receiver, redis_url: str, logdir: Path, client: httpx.Client
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "LOG_PROMPTS": "true",
    }
    stack = Stack(private_db(redis_url), logdir, env).start()
    trace_id, _, traceparent = _client_trace()
    try:
        prompt = '[call calculator {"expression": "98765 * 1001"}] secret-prompt-text'
        stream = sse.read(
            client,
            stack.gateway.url + "/chat",
            params={"prompt": prompt},
            headers={"traceparent": traceparent},
        )
        assert sse.ends_done(stream)
    finally:
        stack.stop()

    def chats() -> list[dict[str, Any]]:
        return [s for s in receiver.trace(trace_id) if s["name"] == f"chat {MODEL}"]

    wait_until(lambda: len(chats()) == 2, 10, "a span per upstream request")
    calling, answering = (c["attributes"] for c in chats())
    assert "secret-prompt-text" in calling["gen_ai.input.messages"]
    [called] = json.loads(calling["gen_ai.output.messages"])
    [call] = called["parts"]  # the first answer is the call alone
    assert call["type"] == "tool_call" and call["name"] == "calculator" and call["id"]
    assert json.loads(call["arguments"]) == {"expression": "98765 * 1001"}
    [answer] = json.loads(answering["gen_ai.output.messages"])
    assert answer["parts"] == [{"type": "text", "content": stream.text}]
    assert "98863765" in answering["gen_ai.input.messages"]  # the tool's output went back


def test_an_openai_clients_traceparent_joins_its_trace_too(
    traced: Stack, receiver: Receiver, client: httpx.Client
) -> None:
    trace_id, client_span, traceparent = _client_trace()
    answer = client.post(
        traced.gateway.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers={**_auth("key-a"), "traceparent": traceparent},
    )
    assert answer.status_code == 200
    names = {"streamgate.enqueue", "streamgate.job"}
    wait_until(lambda: names <= {s["name"] for s in receiver.trace(trace_id)}, 10, "its spans")
    assert _one(receiver.trace(trace_id), "streamgate.enqueue")["parent"] == client_span


def test_with_tracing_off_no_span_work_is_done(
    redis_url: str, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked, not assumed: every way into span work fails this test if taken, while a job
    is created, cancelled and read again on an in-process gateway, and an upstream request
    and a tool call run as a worker runs them."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.setup("off") and not tracing.enabled()

    def touched(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("span work was done with tracing off")

    for target in (sdk_trace.Tracer, trace_api.NoOpTracer, trace_api.ProxyTracer):
        monkeypatch.setattr(target, "start_span", touched)
        monkeypatch.setattr(target, "start_as_current_span", touched)
    monkeypatch.setattr(TraceContextTextMapPropagator, "extract", touched)
    monkeypatch.setattr(trace_api, "get_current_span", touched)

    url = private_db(redis_url)
    try:
        with TestClient(create_app(Settings(redis_url=url))) as gateway:
            headers = {"traceparent": _client_trace()[2]}
            job = gateway.post("/chat", json={"prompt": "hi"}, headers=headers).json()
            assert gateway.delete(f"/chat/{job['job_id']}").status_code == 204
            events = gateway.get(job["events_url"], headers=headers)
            assert '"error"' in events.text
    finally:
        release_db(url)

    async def worker_side() -> None:
        upstream = Upstream(Settings(openai_base_url=stack.llm.url + "/v1"))
        try:
            deltas = [d async for d in upstream.stream([{"role": "user", "content": "hi"}])]
        finally:
            await upstream.close()
        assert deltas
        toolbox = ToolRegistry(builtin_tools(["calculator"])).offered(None)
        assert (await toolbox.run("calculator", '{"expression": "1+1"}', "call_1")).ok

    asyncio.run(worker_side())
    with tracing.span("anything") as span:
        assert span is None
