"""A custom agent through ``AGENT=`` (examples/agents/faq_agent.py): its events stream,
resume on another gateway and cancel like the built-in agent's; a bad ``AGENT`` stops the
worker at start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from . import sse
from .harness import ROOT, Stack, private_db, wait_until

EXAMPLES = ROOT / "examples" / "agents"


def agent_env(spec: str = "faq_agent:answer") -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(EXAMPLES), os.environ.get("PYTHONPATH", "")) if p)
    return {"AGENT": spec, "PYTHONPATH": path}


@pytest.fixture(scope="module")
def faq_stack(redis_url: str, logdir: Path) -> Iterator[Stack]:
    stack = Stack(private_db(redis_url), logdir, agent_env()).start(gateways=2)
    yield stack
    stack.stop()


def test_its_events_stream_and_end_with_done(faq_stack: Stack, client: httpx.Client) -> None:
    stream = sse.read(client, faq_stack.gateway.url + "/chat", params={"prompt": "refund?"})
    assert sse.ends_done(stream)
    kinds = [next(iter(e)) if "lifecycle" not in e else e["lifecycle"] for e in stream.events]
    assert kinds[:4] == ["queued", "started", "tool_call", "tools_called"]
    assert set(kinds[4:-1]) == {"token"} and kinds[-1] == "done"
    [[lookup]] = [e["tools_called"] for e in stream.events if "tools_called" in e]
    assert lookup["name"] == "faq_lookup"
    assert lookup["output"].startswith("Refunds are paid within 14 days")
    assert 'You said: "refund?"' in stream.text  # the demo model's answer, streamed through
    assert stream.finals[0]["finish_reason"] == "stop"
    assert stream.finals[0]["usage"]["completion_tokens"] > 0


def test_it_resumes_on_another_gateway_exactly(faq_stack: Stack, client: httpx.Client) -> None:
    first, second = faq_stack.gateways
    head = sse.read(
        client, first.url + "/chat", params={"prompt": "[long 60] [delay 0.02]"}, stop_after=20
    )
    assert not head.finals
    rest = sse.read(client, second.url + "/chat", headers={"Last-Event-ID": head.last_id})
    assert sse.ends_done(rest)
    job_id = head.events[0]["job_id"]
    whole = sse.read(client, f"{second.url}/chat/{job_id}/events")
    assert head.text + rest.text == whole.text == "".join(f"t{i} " for i in range(60))


def test_a_delete_stops_it_and_its_upstream_request(faq_stack: Stack, client: httpx.Client) -> None:
    url = faq_stack.gateway.url
    job_id = client.post(url + "/chat", json={"prompt": "[long 1000] [delay 0.05]"}).json()[
        "job_id"
    ]
    head = sse.read(client, f"{url}/chat/{job_id}/events", stop_after=8)
    assert head.text
    asked_at = time.monotonic()
    assert client.delete(f"{url}/chat/{job_id}").status_code == 204
    wait_until(lambda: faq_stack.llm_stats()["open_streams"] == 0, 5, "the upstream to close")
    assert time.monotonic() - asked_at < 1.5
    rest = sse.read(client, f"{url}/chat/{job_id}/events", headers={"Last-Event-ID": head.last_id})
    assert rest.finals == [{"error": "cancelled"}]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("no_such_module:answer", "AGENT: cannot import 'no_such_module'"),
        ("faq_agent:missing", "AGENT: module 'faq_agent' has no 'missing'"),
        ("faq_agent:lookup", "AGENT: faq_agent:lookup must be an async generator function"),
        ("faq_agent", "AGENT"),
    ],
)
def test_a_bad_agent_stops_the_worker_at_start(spec: str, says: str) -> None:
    env = {**os.environ, **agent_env(spec), "REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run(
        [sys.executable, "-m", "worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert says in done.stderr, done.stderr


def test_an_agent_yielding_the_contracts_json_objects_streams_them(
    redis_url: str, logdir: Path, client: httpx.Client
) -> None:
    """PROTOCOL names an agent's events by their JSON: an agent written from it alone
    streams, ends with its ``done``, or with its ``error``."""
    fixtures = str(ROOT / "tests" / "fixtures")
    env = {**agent_env("wire_agent:answer"), "PYTHONPATH": fixtures}
    stack = Stack(private_db(redis_url), logdir, env).start()
    try:
        stream = sse.read(client, stack.gateway.url + "/chat", params={"prompt": "hello wire"})
        assert [e for e in stream.events if "lifecycle" not in e][:2] == [
            {"tool_call": {"id": "call_1", "name": "echo"}},
            {"tools_called": [{"id": "call_1", "name": "echo", "arguments": {"text": "hello wire"},
                               "output": "hello wire"}]},
        ]  # fmt: skip
        assert stream.text == "hello wire "
        assert stream.finals == [
            {"lifecycle": "done", "finish_reason": "stop",
             "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
        ]  # fmt: skip
        failed = sse.read(client, stack.gateway.url + "/chat", params={"prompt": "give up"})
        assert failed.text == "partial " and failed.finals == [{"error": "the wire agent gave up"}]
    finally:
        stack.stop()


def test_an_agents_malformed_event_ends_its_job_at_once_and_it_never_runs_again(
    redis_url: str, logdir: Path, client: httpx.Client
) -> None:
    """An event whose fields are not what the contract's JSON says ends the job with an
    error at once. Before, it failed the job's publishing: the job hung until its worker
    counted as lost, and one that had published nothing ran again, thrice."""
    fixtures = str(ROOT / "tests" / "fixtures")
    env = {**agent_env("careless_agent:answer"), "PYTHONPATH": fixtures}
    stack = Stack(private_db(redis_url), logdir, env).start()
    try:
        malformed = (
            "a number for a token",
            "no name for a call",
            "a set for arguments",
            "a number for a finish reason",
        )
        for prompt in malformed:
            began = time.monotonic()
            stream = sse.read(client, stack.gateway.url + "/chat", params={"prompt": prompt})
            assert time.monotonic() - began < 5, prompt
            assert stream.finals == [{"error": "the worker failed unexpectedly; see its logs"}]
            started = [e for e in stream.events if e.get("lifecycle") == "started"]
            assert len(started) == 1, prompt  # run once
            assert all(isinstance(e["token"], str) for e in stream.events if "token" in e)
            assert all(e["tool_call"]["name"] for e in stream.events if "tool_call" in e)
        # Text no UTF-8 can carry (a lone surrogate) streams, made well-formed.
        stream = sse.read(
            client, stack.gateway.url + "/chat", params={"prompt": "a lone surrogate"}
        )
        assert stream.text == "a\ufffdb" and sse.ends_done(stream), stream.events
        (called,) = [e["tools_called"] for e in stream.events if "tools_called" in e]
        assert called[0]["arguments"] == {"q": "\ufffd"} and called[0]["output"] == "x\ufffd"
    finally:
        stack.stop()
