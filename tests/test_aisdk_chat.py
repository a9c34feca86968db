"""The AI SDK endpoint in a running stack, read with the strict SSE reader: its parts and
headers, resume, cancel, and bad bodies refused before anything is enqueued."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .harness import Stack, private_db, wait_until


@pytest.fixture(scope="module")
def ai_stack(redis_url: str, logdir: Path) -> Iterator[Stack]:
    stack = Stack(private_db(redis_url), logdir, {"API_KEYS": "key-a,key-b"}).start()
    yield stack
    stack.stop()


def body(chat_id: str, *texts: str, **extra: Any) -> dict[str, Any]:
    messages = [
        {"id": f"m{i}", "role": "user" if i % 2 == 0 else "assistant",
         "parts": [{"type": "text", "text": text}]}
        for i, text in enumerate(texts)
    ]  # fmt: skip
    return {"id": chat_id, "messages": messages, "trigger": "submit-message", **extra}


def parts(response: httpx.Response) -> list[dict[str, Any]]:
    """The stream's parts, checking its framing strictly: ``data:`` lines only, [DONE] last."""
    blocks = [b for b in response.text.split("\n\n") if b and not b.startswith(":")]
    assert blocks[-1] == "data: [DONE]"
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks)
    return [json.loads(b[6:]) for b in blocks[:-1]]


def auth(key: str = "key-a") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_an_answer_as_ui_message_parts(ai_stack: Stack) -> None:
    url = ai_stack.gateway.url
    response = httpx.post(url + "/aisdk/chat", json=body("c1", "hello"), headers=auth(), timeout=30)
    assert response.status_code == 200
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert response.headers["content-type"].startswith("text/event-stream")
    got = parts(response)
    types = [p["type"] for p in got]
    assert types[:3] == ["start", "start-step", "text-start"]
    assert types[-3:] == ["text-end", "finish-step", "finish"]
    assert set(types[3:-3]) == {"text-delta"}
    text = "".join(p["delta"] for p in got if p["type"] == "text-delta")
    assert 'You said: "hello"' in text
    ids = {p["id"] for p in got if p["type"].startswith("text-")}
    assert len(ids) == 1
    assert got[-1] == {"type": "finish", "finishReason": "stop"}


def test_the_whole_conversation_reaches_the_model(ai_stack: Stack) -> None:
    response = httpx.post(
        ai_stack.gateway.url + "/aisdk/chat",
        json=body("c2", "first", "an answer", "[echo]"),
        headers=auth(),
        timeout=30,
    )
    text = "".join(p["delta"] for p in parts(response) if p["type"] == "text-delta")
    sent = json.loads(text)
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in sent[1:]] == ["first", "an answer", "[echo]"]


def test_an_error_is_an_error_part(ai_stack: Stack) -> None:
    response = httpx.post(
        ai_stack.gateway.url + "/aisdk/chat", json=body("c3", "[http 500]"), headers=auth(),
        timeout=30,
    )  # fmt: skip
    got = parts(response)
    assert got[-1]["type"] == "error" and "HTTP 500" in got[-1]["errorText"]


def test_resume_cancel_and_204(ai_stack: Stack) -> None:
    url = ai_stack.gateway.url
    with httpx.Client(timeout=30, headers=auth()) as client:
        assert client.get(url + "/aisdk/chat/c4/stream").status_code == 204  # never started
        with client.stream(
            "POST", url + "/aisdk/chat", json=body("c4", "[long 1000] [delay 0.05]")
        ) as started:
            next(started.iter_raw())
        # Another key's chat of that id is nothing of this one's.
        assert client.get(url + "/aisdk/chat/c4/stream", headers=auth("key-b")).status_code == 204
        asked_at = time.monotonic()
        with client.stream("GET", url + "/aisdk/chat/c4/stream") as live:
            assert live.status_code == 200
            assert client.delete(url + "/aisdk/chat/c4/stream").status_code == 204
            replay = "".join(chunk for chunk in live.iter_text())
        assert time.monotonic() - asked_at < 10
        assert '"type":"error","errorText":"cancelled"' in replay
        assert replay.endswith("data: [DONE]\n\n")
        wait_until(lambda: ai_stack.llm_stats()["open_streams"] == 0, 5, "the upstream to close")
        assert client.get(url + "/aisdk/chat/c4/stream").status_code == 204


def test_a_client_that_leaves_has_its_answer_cancelled_after_the_grace(ai_stack: Stack) -> None:
    url = ai_stack.gateway.url
    with httpx.Client(timeout=30, headers=auth()) as client:
        slow = body("c7", "[long 1000] [delay 0.05]")
        with client.stream("POST", url + "/aisdk/chat", json=slow) as left:
            lines = left.iter_lines()
            job_id = json.loads(next(lines)[6:])["messageId"]
            next(line for line in lines if '"text-delta"' in line)  # the model is answering
        # useChat's stop(): the connection closes, nothing else. The grace is 2 s here;
        # nobody reads meanwhile (a reader would keep the answer going).
        wait_until(lambda: ai_stack.llm_stats()["open_streams"] == 0, 10, "the cancel")
        events = client.get(f"{url}/chat/{job_id}/events").text
        assert '"error":"cancelled: every reader disconnected"' in events
        assert client.get(url + "/aisdk/chat/c7/stream").status_code == 204


@pytest.mark.parametrize(
    ("sent", "says"),
    [
        ({"messages": []}, "id:"),
        (body("../x", "hi"), "id:"),
        (body("c", "hi", trigger="retry"), "trigger:"),
        ({"id": "c", "messages": []}, "messages:"),
        ({"id": "c", "messages": [{"role": "user", "parts": [{"type": "file"}]}]}, "only text"),
        (body("c", "hi", "there"), "the last message must be the user's"),
        (body("c", "  "), "has no text"),
        (body("c", "hi", role="nobody"), "unknown role"),
        (body("c", "x" * 40_000), "MAX_PROMPT_CHARS"),
    ],
)
def test_bad_bodies_are_refused_and_enqueue_nothing(
    ai_stack: Stack, sent: dict[str, Any], says: str
) -> None:
    response = httpx.post(ai_stack.gateway.url + "/aisdk/chat", json=sent, headers=auth())
    assert response.status_code in (400, 413), response.text
    assert says in response.json()["error"]


def test_keys_are_needed(ai_stack: Stack) -> None:
    url = ai_stack.gateway.url
    assert httpx.post(url + "/aisdk/chat", json=body("c5", "hi")).status_code == 401
    assert httpx.get(url + "/aisdk/chat/c5/stream").status_code == 401
    assert httpx.delete(url + "/aisdk/chat/c5/stream").status_code == 401


def test_a_new_message_ends_the_chats_answer_still_running(ai_stack: Stack) -> None:
    url = ai_stack.gateway.url
    with httpx.Client(timeout=30, headers=auth()) as client:
        with client.stream(
            "POST", url + "/aisdk/chat", json=body("c6", "[long 1000] [delay 0.05]")
        ) as old:
            first = json.loads(next(old.iter_lines())[6:])
        old_job = first["messageId"]
        new = client.post(url + "/aisdk/chat", json=body("c6", "hello again"))
        assert parts(new)[-1]["type"] == "finish"
        events = client.get(f"{url}/chat/{old_job}/events").text
        assert '{"error":"cancelled"}' in events


def test_an_error_settles_the_tool_calls_it_interrupted() -> None:
    from gateway.ui_message_stream import UIMessageParts

    encoder = UIMessageParts("job")
    out = [
        *encoder.encode({"lifecycle": "queued", "job_id": "job", "position": 0}),
        *encoder.encode({"tool_call": {"id": "call_0", "name": "slow"}}),
        *encoder.encode({"error": "cancelled"}),
    ]
    sent = [json.loads(line[6:]) for line in out if line != b"data: [DONE]\n\n"]
    assert [p["type"] for p in sent] == [
        "start", "start-step", "tool-input-start", "tool-output-error", "finish-step", "error"
    ]  # fmt: skip
    assert sent[3] == {
        "type": "tool-output-error", "toolCallId": "call_0", "errorText": "cancelled",
        "dynamic": True, "providerExecuted": True,
    }  # fmt: skip
    assert out[-1] == b"data: [DONE]\n\n"


def test_an_error_after_a_tool_round_leaves_its_answered_calls_as_they_were() -> None:
    """Only calls started and never answered get an error part: one whose output was sent
    keeps it (useChat would turn an answered call's part into an error)."""
    from gateway.ui_message_stream import UIMessageParts

    encoder = UIMessageParts("job")
    out = [
        *encoder.encode({"tool_call": {"id": "call_0", "name": "calc"}}),
        *encoder.encode(
            {"tools_called": [{"id": "call_0", "name": "calc", "arguments": {}, "output": "4"}]}
        ),
        *encoder.encode({"tool_call": {"id": "call_1", "name": "calc"}}),
        *encoder.encode({"error": "too many tool rounds"}),
    ]
    sent = [json.loads(line[6:]) for line in out if line != b"data: [DONE]\n\n"]
    errors = [p["toolCallId"] for p in sent if p["type"] == "tool-output-error"]
    assert errors == ["call_1"]
    assert [p["toolCallId"] for p in sent if p["type"] == "tool-output-available"] == ["call_0"]


def test_done_settles_a_tool_call_its_agent_never_answered() -> None:
    """A custom agent may start a call and never answer it: left as it is, useChat shows
    that part streaming its input forever."""
    from gateway.ui_message_stream import UIMessageParts

    encoder = UIMessageParts("job")
    out = [
        *encoder.encode({"tool_call": {"id": "ghost", "name": "lookup"}}),
        *encoder.encode({"token": "hi"}),
        *encoder.encode({"lifecycle": "done"}),
    ]
    sent = [json.loads(line[6:]) for line in out if line != b"data: [DONE]\n\n"]
    assert [p["type"] for p in sent] == [
        "start", "start-step", "tool-input-start", "text-start", "text-delta", "text-end",
        "tool-output-error", "finish-step", "finish",
    ]  # fmt: skip
    assert sent[6]["toolCallId"] == "ghost" and sent[6]["errorText"]


def test_an_event_the_stream_does_not_show_is_a_ping(monkeypatch: pytest.MonkeyPatch) -> None:
    """``started`` has no part: it still restarted the reader's wait for a ping, so it goes
    out as one, or a client would hear nothing for two ping intervals."""
    from gateway import job_events
    from gateway.reader import PING
    from gateway.ui_message_stream import UIMessageParts

    async def relayed(*_: object, **__: object) -> AsyncIterator[object]:
        yield (0.0, {"lifecycle": "queued", "job_id": "job", "position": 1})
        yield (0.0, {"lifecycle": "started"})
        yield None  # the reader's own ping
        yield (0.0, {"token": "hi"})

    monkeypatch.setattr(job_events, "relayed", relayed)

    async def frames() -> list[bytes]:
        encode = UIMessageParts("job").encode
        return [f async for f in job_events.encoded(None, "job", encode)]  # type: ignore[arg-type]

    out = asyncio.run(frames())
    assert out[1:3] == [PING, PING] and b"text-delta" in out[3], out


def test_head_on_an_active_chats_stream_answers_headers_and_holds_nothing(
    ai_stack: Stack,
) -> None:
    """HEAD opens no stream: the connection it came on serves the next request at once, and
    the answer, unread, is cancelled after its grace as with any reader gone."""
    url = ai_stack.gateway.url
    with httpx.Client(timeout=10, headers=auth()) as client:
        with client.stream(
            "POST", url + "/aisdk/chat", json=body("c9", "[long 1000] [delay 0.05]")
        ) as running:
            job_id = json.loads(next(running.iter_lines())[6:])["messageId"]
        head = client.head(url + "/aisdk/chat/c9/stream")
        assert head.status_code == 200 and head.headers["x-vercel-ai-ui-message-stream"] == "v1"
        assert client.get(url + "/healthz", timeout=3).status_code == 200  # same connection
        # Nobody reads meanwhile (a reader would keep the answer going): the grace is 2 s.
        wait_until(lambda: ai_stack.llm_stats()["open_streams"] == 0, 10, "the cancel")
        events = client.get(f"{url}/chat/{job_id}/events").text
        assert '"error":"cancelled: every reader disconnected"' in events
