"""OpenAI's Responses API through Streamgate's jobs, driven by the official ``openai`` SDK:
background mode, resuming on another gateway, cancel, conversations, tools, faults."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from demo_llm.scripts import HARD_TOKENS

from .harness import Stack, private_db, wait_until

HARD_TEXT = "".join(HARD_TOKENS)
LONG_20 = "".join(f"t{i} " for i in range(20))
CALCULATOR = {
    "type": "function",
    "name": "calculator",
    "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def two(redis_url: str, logdir: Path) -> Iterator[Stack]:
    """Two gateways, one worker, shared by the tests that do not break them."""
    stack = Stack(private_db(redis_url), logdir).start(gateways=2)
    yield stack
    stack.stop()


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def deltas(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_a_response_is_the_models_text_exactly(two: Stack) -> None:
    with sdk(two.gateway.url) as client:
        response = client.responses.create(model="assistant", input="[hard]")
    assert response.status == "completed" and response.output_text == HARD_TEXT
    assert response.id.startswith("resp_") and response.model == "assistant"
    assert response.usage is not None and response.usage.output_tokens == len(HARD_TOKENS)


def test_a_response_cut_short_says_so_and_echoes_what_was_asked(two: Stack) -> None:
    text_format = {"type": "json_schema", "name": "x", "schema": {"type": "object"}}
    body = {
        "model": "assistant",
        "input": "[long 5]",
        "max_output_tokens": 3,
        "text": {"format": text_format},
        "parallel_tool_calls": False,
        "stream": None,  # as OpenAI's: null is the default
        "background": None,
    }
    response = httpx.post(two.gateway.url + "/v1/responses", json=body, timeout=10).json()
    assert response["status"] == "incomplete" and response["background"] is False
    assert [item["status"] for item in response["output"]] == ["incomplete"]
    assert response["output"][0]["content"][0]["text"] == "t0 t1 t2 "
    assert response["text"] == {"format": text_format} and response["parallel_tool_calls"] is False
    assert isinstance(response["created_at"], int)  # whole seconds, as OpenAI's
    with sdk(two.gateway.url) as client:
        events = list(
            client.responses.create(
                model="assistant", input="[long 5]", max_output_tokens=3, stream=True
            )
        )
    done = [e.item.status for e in events if e.type == "response.output_item.done"]
    assert done == ["incomplete"] and events[-1].type == "response.incomplete"


def test_an_item_reference_stands_for_that_output_item_of_a_stored_response(two: Stack) -> None:
    """The AI SDK sends an earlier answer back as a reference to its item (store is on):
    the conversation gets that item; one that names no item of the caller's is a 404."""
    with sdk(two.gateway.url) as client:
        first = client.responses.create(model="assistant", input="[long 3]")
        reference = {"type": "item_reference", "id": first.output[0].id}
        turns = [{"role": "user", "content": "[long 3]"}, reference]
        body = {"model": "assistant", "input": [*turns, {"role": "user", "content": "[echo]"}]}
        answer = httpx.post(two.gateway.url + "/v1/responses", json=body, timeout=10).json()
        sent = json.loads(answer["output"][0]["content"][0]["text"])
        assert sent[-2] == {"role": "assistant", "content": "t0 t1 t2 "}, sent
        for unknown in (first.output[0].id[:-1] + "9", "msg_nope"):
            body["input"] = [{"type": "item_reference", "id": unknown}]
            missing = httpx.post(two.gateway.url + "/v1/responses", json=body)
            assert missing.status_code == 404, missing.text
            assert missing.json()["error"]["param"] == "input[0].id"
        body["input"] = [{"type": "item_reference", "id": 7}]
        malformed = httpx.post(two.gateway.url + "/v1/responses", json=body)
        assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "input[0].id"


def test_item_references_past_the_prompt_limit_are_refused_before_all_are_read(
    two: Stack,
) -> None:
    """Each reference reads a whole stored response: past MAX_PROMPT_CHARS of what was read
    (two answers of ~17,000 characters) the request is a 413 at once, not after reading
    every response it names."""
    with sdk(two.gateway.url) as client:
        long = [client.responses.create(model="assistant", input="[long 3000] [delay 0]")]
        long.append(client.responses.create(model="assistant", input="[long 3000] [delay 0]"))
    references = [{"type": "item_reference", "id": r.output[0].id} for r in long]
    body = {"model": "assistant", "input": [*references, {"role": "user", "content": "hi"}]}
    refused = httpx.post(two.gateway.url + "/v1/responses", json=body, timeout=10)
    assert refused.status_code == 413, refused.text
    assert refused.json()["error"]["param"] == "input[1].id"
    assert "MAX_PROMPT_CHARS" in refused.json()["error"]["message"]


def test_a_failed_response_not_streamed_is_a_500_with_the_error(two: Stack) -> None:
    """Not a 200 holding status failed: clients (the AI SDK) read a 200 as an answer, and
    could not parse this one."""
    body = {"model": "assistant", "input": "[error-mid]"}
    failed = httpx.post(two.gateway.url + "/v1/responses", json=body, timeout=10)
    assert failed.status_code == 500, failed.text
    error = failed.json()["error"]
    assert error["type"] == "server_error" and "mid-answer" in error["message"]


def test_a_background_stream_resumes_on_another_gateway_exactly(two: Stack) -> None:
    first, second = two.gateways
    with sdk(first.url) as client:
        stream = client.responses.create(
            model="assistant", input="[long 20] [delay 0.05]", background=True, stream=True
        )
        seen = []
        for event in stream:
            seen.append(event)
            if event.type == "response.output_text.delta" and len(seen) > 8:
                break
        stream.close()
    response_id = seen[0].response.id  # type: ignore[union-attr]
    last = seen[-1].sequence_number
    with sdk(second.url) as client:
        rest = list(client.responses.retrieve(response_id, stream=True, starting_after=last))
        again = list(client.responses.retrieve(response_id, stream=True))
        assert client.responses.retrieve(response_id).status == "completed"
    numbers = [e.sequence_number for e in seen + rest]
    assert numbers == list(range(len(numbers))), "nothing lost, nothing repeated"
    assert [e.type for e in seen][:3] == [
        "response.created",
        "response.queued",
        "response.in_progress",
    ]
    assert rest[-1].type == "response.completed"
    assert rest[-1].response.output_text == LONG_20  # type: ignore[union-attr]
    assert deltas(seen + rest) == LONG_20
    # Every reader numbers the events alike, whichever gateway and whenever it joins.
    assert [e.model_dump() for e in again] == [e.model_dump() for e in seen + rest]


def test_a_background_response_is_queued_then_runs_to_its_end_unread(two: Stack) -> None:
    with sdk(two.gateway.url) as client:
        created = client.responses.create(model="assistant", input="[long 5]", background=True)
        assert created.status == "queued" and created.background is True
        wait_until(
            lambda: client.responses.retrieve(created.id).status == "completed", 10, "its end"
        )
        retrieved = client.responses.retrieve(created.id)
        assert retrieved.output_text == "t0 t1 t2 t3 t4 "
        assert retrieved.created_at == created.created_at  # one clock: the job's first event


def test_cancel_is_idempotent_and_leaves_a_finished_response_as_it_ended(two: Stack) -> None:
    with sdk(two.gateway.url) as client:
        running = client.responses.create(
            model="assistant", input="[long 200] [delay 0.05]", background=True
        )
        assert client.responses.cancel(running.id).status == "cancelled"
        assert client.responses.cancel(running.id).status == "cancelled"
        assert client.responses.retrieve(running.id).status == "cancelled"
        done = client.responses.create(model="assistant", input="[long 3]")
        assert client.responses.cancel(done.id).status == "completed"
        with pytest.raises(openai.NotFoundError):
            client.responses.cancel("resp_" + "0" * 32)


def test_previous_response_id_continues_the_conversation(two: Stack) -> None:
    with sdk(two.gateway.url) as client:
        first = client.responses.create(
            model="assistant", input="my name is Ada", instructions="Be brief."
        )
        second = client.responses.create(
            model="assistant", input="[echo] what is my name?", previous_response_id=first.id
        )
    sent = json.loads(second.output_text)
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1]["content"] == "my name is Ada"
    assert sent[2]["content"] == first.output_text  # the answer, exactly
    assert all("Be brief." not in (m["content"] or "") for m in sent), "instructions do not carry"


def test_function_tools_come_back_as_calls_and_their_outputs_go_on(two: Stack) -> None:
    with sdk(two.gateway.url) as client:
        asked = client.responses.create(
            model="assistant",
            input="calculate 6 * 7",
            tools=[CALCULATOR],  # type: ignore[list-item]
        )
        (call,) = asked.output
        assert call.type == "function_call" and call.name == "calculator"
        assert json.loads(call.arguments) == {"expression": "6 * 7"}
        answered = client.responses.create(
            model="assistant",
            previous_response_id=asked.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "42"}],
            tools=[CALCULATOR],  # type: ignore[list-item]
        )
    assert answered.output_text == "From the tools: calculator said 42."


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "assistant"}, 400, "input"),
        ({"model": "assistant", "input": [{"type": "image"}]}, 400, "input[0].type"),
        (
            {"model": "assistant", "input": [{"role": ["user"], "content": "x"}]},
            400,
            "input[0].role",
        ),
        (
            {"model": "assistant", "input": [{"role": "user", "content": [{"type": ["text"]}]}]},
            400,
            "input[0].content[0]",
        ),
        ({"model": "assistant", "input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools[0]"),
        ({"model": "assistant", "input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"model": "gpt-nope", "input": "hi"}, 404, "model"),
        ({"model": "assistant", "input": "hi", "prompt": {"id": "pmpt_1"}}, 400, "prompt"),
        ({"model": "assistant", "input": "hi", "conversation": "conv_1"}, 400, "conversation"),
        ({"model": "assistant", "input": "hi", "top_logprobs": 2}, 400, "top_logprobs"),
        (
            {"model": "assistant", "input": "hi", "include": ["message.output_text.logprobs"]},
            400,
            "include",
        ),
        (
            {"model": "assistant", "input": "hi", "text": {"format": {"type": "xml"}}},
            400,
            "text.format",
        ),
        ({"model": "assistant", "input": "hi", "background": "yes"}, 400, "background"),
        ({"model": "assistant", "input": "hi", "metadata": ["x"]}, 400, "metadata"),
        (
            {"model": "assistant", "input": "hi", "text": {"format": {"type": "json_schema"}}},
            400,
            "text.format.name",
        ),
        (
            {
                "model": "assistant",
                "input": "hi",
                "text": {"format": {"type": "json_schema", "name": "a", "strict": "yes"}},
            },
            400,
            "text.format.schema",
        ),
        ({"model": "assistant", "input": "hi", "metadata": {"k": 1}}, 400, "metadata"),
        ({"model": "assistant", "input": "x" * 40_000}, 413, "input"),
        (
            {"model": "assistant", "input": "hi", "previous_response_id": "resp_" + "1" * 32},
            404,
            "previous_response_id",
        ),
    ],
)
def test_a_bad_request_is_openais_error_naming_the_field(
    two: Stack, body: dict[str, object], status: int, param: str
) -> None:
    response = httpx.post(two.gateway.url + "/v1/responses", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_a_bad_starting_after_is_openais_error_naming_it(two: Stack) -> None:
    response_id = (
        sdk(two.gateway.url).responses.create(model="assistant", input="hi", background=True).id
    )
    for bad in ("--1", "-2", "\u00b9", "1.5", "x", "", "0" * 5000):
        response = httpx.get(
            f"{two.gateway.url}/v1/responses/{response_id}",
            params={"stream": "true", "starting_after": bad},
        )
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["param"] == "starting_after"
    not_utf8 = httpx.get(f"{two.gateway.url}/v1/responses/{response_id}?stream=true%ff")
    assert not_utf8.status_code == 400 and "UTF-8" in not_utf8.json()["error"]["message"]


def test_an_unknown_response_is_a_404(two: Stack) -> None:
    for url in ("/v1/responses/resp_" + "2" * 32, "/v1/responses/nope"):
        response = httpx.get(two.gateway.url + url)
        assert response.status_code == 404 and response.json()["error"]["message"]


def test_a_killed_worker_fails_the_response_in_time(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    with sdk(stack.gateway.url) as client:
        stream = client.responses.create(
            model="assistant", input="[long 400] [delay 0.05]", background=True, stream=True
        )
        events = iter(stream)
        while next(events).type != "response.output_text.delta":
            pass
        stack.workers[0].kill(signal.SIGKILL)
        killed = time.monotonic()
        rest = list(events)
    assert rest[-1].type == "response.failed"
    assert rest[-1].response.status == "failed"  # type: ignore[union-attr]
    assert time.monotonic() - killed < 3 + 2  # WORKER_LOST_TIMEOUT_S is 3 here


def test_a_killed_gateway_loses_and_repeats_nothing(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(gateways=2)
    first, second = stack.gateways
    with sdk(first.url) as client:
        stream = client.responses.create(
            model="assistant", input="[long 60] [delay 0.05]", background=True, stream=True
        )
        seen = []
        with pytest.raises(openai.APIConnectionError):
            for event in stream:
                seen.append(event)
                if len(seen) == 12:
                    first.kill(signal.SIGKILL)
    with sdk(second.url) as client:
        rest = list(
            client.responses.retrieve(
                seen[0].response.id,  # type: ignore[union-attr]
                stream=True,
                starting_after=seen[-1].sequence_number,
            )
        )
    numbers = [e.sequence_number for e in seen + rest]
    assert numbers == list(range(len(numbers)))
    assert deltas(seen + rest) == "".join(f"t{i} " for i in range(60))


def test_a_dropped_foreground_stream_is_cancelled_after_the_grace(
    two: Stack, client: httpx.Client
) -> None:
    before = client.get(two.llm.url + "/demo/stats").json()["closed_early"]
    with sdk(two.gateway.url) as oa:
        stream = oa.responses.create(
            model="assistant", input="[long 400] [delay 0.05]", stream=True
        )
        response_id = next(iter(stream)).response.id  # type: ignore[union-attr]
        stream.close()
        stats = lambda: client.get(two.llm.url + "/demo/stats").json()  # noqa: E731
        wait_until(lambda: stats()["closed_early"] > before, 15, "the cancel")
        assert oa.responses.retrieve(response_id).status == "cancelled"


def test_head_on_a_running_responses_stream_never_hangs(two: Stack) -> None:
    with sdk(two.gateway.url) as client:
        running = client.responses.create(
            model="assistant", input="[long 100] [delay 0.1]", background=True
        )
        url = f"{two.gateway.url}/v1/responses/{running.id}?stream=true"
        head = httpx.head(url, timeout=5)
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/event")
        client.responses.cancel(running.id)
