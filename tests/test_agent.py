"""The agent against the demo LLM through the real SDK: tools, memory, roles."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared import events as ev
from worker.chat_job import _with_valid_usage

from . import sse
from .harness import Stack, private_db


@pytest.fixture(scope="module")
def agent_stack(redis_url: str, logdir: Path) -> Iterator[Stack]:
    stack = Stack(private_db(redis_url), logdir, {"MAX_TOOL_ROUNDS": "3"}).start()
    yield stack
    stack.stop()


def chat(stack: Stack, prompt: str, **params: str) -> sse.Stream:
    with httpx.Client(timeout=30) as client:
        return sse.read(client, stack.gateway.url + "/chat", params={"prompt": prompt, **params})


def kinds(stream: sse.Stream) -> list[str]:
    """The event kinds in order, with runs of tokens collapsed."""
    out: list[str] = []
    for event in stream.events:
        kind = next(iter(event)) if "lifecycle" not in event else event["lifecycle"]
        if not (out and out[-1] == kind == "token"):
            out.append(kind)
    return out


def tools_called(stream: sse.Stream) -> list[dict[str, Any]]:
    found = [e["tools_called"] for e in stream.events if "tools_called" in e]
    assert len(found) == 1, stream.events
    calls: list[dict[str, Any]] = found[0]
    return calls


def test_a_tool_call_streamed_in_pieces(agent_stack: Stack) -> None:
    stream = chat(agent_stack, "calculate 2 + 3 * 4")
    assert kinds(stream) == ["queued", "started", "tool_call", "tools_called", "token", "done"]
    started = next(e["tool_call"] for e in stream.events if "tool_call" in e)
    (call,) = tools_called(stream)
    assert started == {"id": call["id"], "name": "calculator"}
    assert call["id"].startswith("call_")
    assert call["arguments"] == {"expression": "2 + 3 * 4"}
    assert call["output"] == "14"
    assert "calculator said 14" in stream.text


def test_two_parallel_calls(agent_stack: Stack) -> None:
    stream = chat(agent_stack, "calculate 6 * 7 and tell the time in Asia/Tokyo")
    assert kinds(stream) == [
        "queued",
        "started",
        "tool_call",
        "tool_call",
        "tools_called",
        "token",
        "done",
    ]
    calc, clock = tools_called(stream)
    assert (calc["name"], calc["output"]) == ("calculator", "42")
    assert clock["name"] == "current_time"
    assert clock["arguments"] == {"timezone": "Asia/Tokyo"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+09:00", clock["output"])
    assert calc["id"] != clock["id"]


def test_parallel_calls_without_index_are_told_apart_by_id(agent_stack: Stack) -> None:
    stream = chat(agent_stack, "[tool-noindex] calculate 2 * 3 and the time")
    calc, clock = tools_called(stream)
    assert calc["arguments"] == {"expression": "2 * 3"} and calc["output"] == "6"
    assert clock["arguments"] == {} and clock["output"].endswith("+00:00")


@pytest.mark.parametrize(
    ("prompt", "arguments", "words"),
    [
        ("[tool-unknown]", {"city": "Oslo"}, "no tool named 'weather'"),
        ("[tool-badjson]", '{"expression": "1 +', "not valid JSON"),
        ("[tool-invalid]", {"expr": 5}, "invalid arguments for calculator"),
        ("calculate 1 / 0", {"expression": "1 / 0"}, "division by zero"),
    ],
)
def test_tool_failures_become_outputs_for_the_model(
    agent_stack: Stack, prompt: str, arguments: object, words: str
) -> None:
    stream = chat(agent_stack, prompt)
    (call,) = tools_called(stream)
    assert call["arguments"] == arguments
    assert call["output"].startswith("error: ")
    assert words in call["output"]
    assert sse.is_done(stream.events[-1])


def test_the_round_limit_ends_with_an_error(agent_stack: Stack) -> None:
    """Three rounds run; the fourth's call, announced, is answered as not run: every
    tool_call gets its tools_called entry."""
    stream = chat(agent_stack, "[tool-loop]")
    results = [call for e in stream.events for call in e.get("tools_called", [])]
    assert len(results) == 4 and "not run" in results[-1]["output"]
    started = [e["tool_call"]["id"] for e in stream.events if "tool_call" in e]
    assert started == [call["id"] for call in results]
    assert "MAX_TOOL_ROUNDS" in stream.events[-1]["error"]
    assert len(stream.finals) == 1


def test_tool_messages_carry_the_call_ids(agent_stack: Stack) -> None:
    stream = chat(agent_stack, "[echo] calculate 1 + 1")
    (call,) = tools_called(stream)
    sent = json.loads(stream.text)  # the demo echoes the messages of its second request
    assistant = next(m for m in sent if m.get("tool_calls"))
    assert assistant["tool_calls"][0]["id"] == call["id"]
    assert assistant["tool_calls"][0]["function"] == {
        "name": "calculator",
        "arguments": '{"expression":"1 + 1"}',
    }
    tool = next(m for m in sent if m["role"] == "tool")
    assert tool == {"role": "tool", "tool_call_id": call["id"], "content": "2"}


def test_tools_can_be_switched_off(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(TOOLS="none")
    stream = chat(stack, "calculate 2 + 2")
    assert "tool_call" not in kinds(stream)
    assert "demo model" in stream.text


def echo_history(stack: Stack, session: str, **params: str) -> list[dict[str, Any]]:
    stream = chat(stack, "[echo]", session=session, **params)
    sent: list[dict[str, Any]] = json.loads(stream.text)
    return sent


def test_memory_across_three_prompts(agent_stack: Stack) -> None:
    assert sse.is_done(chat(agent_stack, "my name is Ada", session="s-three").events[-1])
    chat(agent_stack, "I like tea", session="s-three")
    sent = echo_history(agent_stack, "s-three")
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert sent[1]["content"] == "my name is Ada"
    assert "my name is Ada" in sent[2]["content"]  # the demo's answer quotes the prompt
    assert sent[3]["content"] == "I like tea"
    assert sent[5]["content"] == "[echo]"


def test_memory_is_bounded_and_expires(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(SESSION_MAX_TURNS="2", SESSION_RETENTION_S="2")
    for prompt in ("one", "two", "three"):
        chat(stack, prompt, session="bounded")
    sent = echo_history(stack, "bounded")
    users = [m["content"] for m in sent if m["role"] == "user"]
    assert users == ["two", "three", "[echo]"]
    time.sleep(2.5)
    assert [m["role"] for m in echo_history(stack, "bounded")] == ["system", "user"]


def test_history_is_cut_to_the_character_budget(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(SESSION_MAX_CHARS="400")
    chat(stack, "old " * 60, session="chars")
    chat(stack, "new", session="chars")
    users = [m["content"] for m in echo_history(stack, "chars") if m["role"] == "user"]
    assert users == ["new", "[echo]"]


def test_a_failed_job_stores_nothing(agent_stack: Stack) -> None:
    assert "error" in chat(agent_stack, "[http 500]", session="s-fail").events[-1]
    chat(agent_stack, "kept", session="s-fail")
    users = [m["content"] for m in echo_history(agent_stack, "s-fail") if m["role"] == "user"]
    assert users == ["kept", "[echo]"]


def test_double_texting_is_a_409(agent_stack: Stack, client: httpx.Client) -> None:
    url = agent_stack.gateway.url + "/chat"
    first = client.post(url, json={"prompt": "[long 40] [delay 0.05]", "session": "busy"})
    assert first.status_code == 202
    second = client.get(url, params={"prompt": "hello?", "session": "busy"})
    assert second.status_code == 409
    assert first.json()["job_id"] in second.json()["error"]
    assert second.json()["job_id"] == first.json()["job_id"]  # for programs, without parsing
    probed = client.head(url, params={"prompt": "hello?", "session": "busy"})
    assert probed.status_code == 409  # a HEAD's answer has no body: the job in a header
    assert probed.headers["Streamgate-Job-Id"] == first.json()["job_id"]
    assert client.post(url, json={"prompt": "again", "session": "busy"}).status_code == 409
    sse.read(client, agent_stack.gateway.url + first.json()["events_url"])
    assert sse.is_done(chat(agent_stack, "now", session="busy").events[-1])


def test_roles(agent_stack: Stack, client: httpx.Client) -> None:
    roles = client.get(agent_stack.gateway.url + "/roles").json()
    assert roles[0]["name"] == "assistant"
    assert {r["name"] for r in roles} >= {"assistant", "concise", "teacher"}
    assert all(r["description"] for r in roles)
    default = echo_history(agent_stack, "r1")[0]
    assert default["role"] == "system" and "helpful assistant" in default["content"]
    teacher = echo_history(agent_stack, "r2", role="teacher")[0]
    assert "patient teacher" in teacher["content"]


def test_without_a_tools_file_the_builtins_are_listed(
    agent_stack: Stack, client: httpx.Client
) -> None:
    tools = client.get(agent_stack.gateway.url + "/tools").json()
    assert [(t["name"], t["source"]) for t in tools] == [
        ("calculator", "builtin"),
        ("current_time", "builtin"),
    ]
    assert all(t["description"] and t["parameters"]["type"] == "object" for t in tools)


def test_an_unknown_role_is_a_400(agent_stack: Stack, client: httpx.Client) -> None:
    for response in (
        client.get(agent_stack.gateway.url + "/chat", params={"prompt": "hi", "role": "pirate"}),
        client.post(agent_stack.gateway.url + "/chat", json={"prompt": "hi", "role": "pirate"}),
    ):
        assert response.status_code == 400
        assert "unknown role 'pirate'" in response.json()["error"]


def test_head_says_409_for_a_busy_session_and_takes_nothing(
    agent_stack: Stack, client: httpx.Client
) -> None:
    url = agent_stack.gateway.url + "/chat"
    first = client.post(url, json={"prompt": "[long 30] [delay 0.05]", "session": "head"})
    head = client.head(url, params={"prompt": "again", "session": "head"})
    assert head.status_code == 409
    sse.read(client, agent_stack.gateway.url + first.json()["events_url"])
    assert client.head(url, params={"prompt": "again", "session": "head"}).status_code == 200


def test_an_agents_usage_that_is_not_whole_token_counts_is_reported_as_none() -> None:
    """A custom agent may hand over floats or absurd figures: the job then reports no usage
    (counted as unknown) rather than a wrong one, and its final write cannot fail on them."""
    fine = ev.Done("stop", ev.Usage(10, 5, 15))
    assert _with_valid_usage(fine) is fine
    floats = ev.Usage(10.0, 5, 15)  # type: ignore[arg-type]
    for bad in (floats, ev.Usage(2**63, 1, 2**63 + 1), ev.Usage(-1, 1, 0)):
        assert _with_valid_usage(ev.Done("stop", bad)) == ev.Done("stop", None)


def test_a_cancelled_job_stores_nothing_and_frees_its_session(
    agent_stack: Stack, client: httpx.Client
) -> None:
    """The session's lock goes with the job's final event, whichever writes it."""
    url = agent_stack.gateway.url + "/chat"
    posted = client.post(url, json={"prompt": "[long 40] [delay 0.05]", "session": "s-cancel"})
    job = posted.json()
    first = sse.read(client, agent_stack.gateway.url + job["events_url"], stop_after=3)
    assert first.text  # it is answering
    assert client.delete(f"{url}/{job['job_id']}").status_code == 204
    users = [m["content"] for m in echo_history(agent_stack, "s-cancel") if m["role"] == "user"]
    assert users == ["[echo]"]  # no 409, and the cancelled turn is not in memory
