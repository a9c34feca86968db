"""OpenAI's Chat Completions through Streamgate's jobs, driven by the official ``openai`` SDK."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from demo_llm.scripts import HARD_TOKENS

from .harness import Stack, wait_until
from .test_job_api import enqueued

HARD_TEXT = "".join(HARD_TOKENS)
CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}


@pytest.fixture
def sdk(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.gateway.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def user(text: object) -> list[dict[str, object]]:
    return [{"role": "user", "content": text}]


def test_models_are_the_roles(sdk: openai.OpenAI) -> None:
    models = sdk.models.list()
    assert [m.id for m in models] == ["assistant", "concise", "teacher"]
    assert {m.object for m in models} == {"model"} and {m.owned_by for m in models}
    assert sdk.models.retrieve("teacher") == models.data[2]
    assert sdk.models.retrieve("streamgate-demo").id == "streamgate-demo"  # the default role's
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.models.retrieve("gpt-nope")
    assert missing.value.code == "model_not_found"


def test_the_sampling_parameters_reach_the_model_and_null_is_a_field_left_out(
    stack: Stack, client: httpx.Client
) -> None:
    body = ask(
        user("[params]"),
        seed=0,
        logit_bias={"50256": -100},
        parallel_tool_calls=False,
        response_format={"type": "json_object"},
        temperature=None,
        stream=None,  # as OpenAI's: not streamed
    )
    response = client.post(stack.gateway.url + "/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    sent = json.loads(response.json()["choices"][0]["message"]["content"])
    assert sent["seed"] == 0 and sent["logit_bias"] == {"50256": -100}
    assert sent["parallel_tool_calls"] is False and "temperature" not in sent
    assert sent["response_format"] == {"type": "json_object"}


def test_a_completion_is_the_models_text_exactly(sdk: openai.OpenAI) -> None:
    answer = sdk.chat.completions.create(model="assistant", messages=user("[hard]"))  # type: ignore[arg-type]
    choice = answer.choices[0]
    assert choice.message.content == HARD_TEXT and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and answer.object == "chat.completion"
    assert answer.usage is not None and answer.usage.completion_tokens == len(HARD_TOKENS)
    assert answer.model == "assistant"
    # What an SDK may send that changes nothing here is taken (a text-only modality, the
    # legacy function_call left at "none", a seed, a user).
    again = sdk.chat.completions.create(
        model="assistant",
        messages=user("[hard]"),  # type: ignore[arg-type]
        modalities=["text"],
        function_call="none",
        seed=7,
        user="u1",
    )
    assert again.choices[0].message.content == HARD_TEXT


def test_a_streamed_completion_is_the_models_text_exactly(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="streamgate-demo",  # the upstream model's name: the default role
            messages=user("[hard]"),  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *answer, last = chunks
    assert len({(c.id, c.created) for c in chunks}) == 1, "one id and created for all"
    assert answer[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in answer) == HARD_TEXT
    assert [c.choices[0].finish_reason for c in answer][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in answer[:-1])
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == len(HARD_TOKENS)
    assert last.usage.total_tokens == last.usage.prompt_tokens + len(HARD_TOKENS)


def test_without_include_usage_no_usage_chunk_comes(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(model="assistant", messages=user("[long 3]"), stream=True)  # type: ignore[arg-type]
    )
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "t0 t1 t2 "


def test_max_tokens_reaches_the_model_and_its_finish_reason_the_client(sdk: openai.OpenAI) -> None:
    answer = sdk.chat.completions.create(
        model="assistant",
        messages=user("[long 50]"),  # type: ignore[arg-type]
        max_tokens=7,
        temperature=0.2,
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content == "".join(f"t{i} " for i in range(7))


def test_the_whole_conversation_goes_upstream_after_the_roles_prompt(sdk: openai.OpenAI) -> None:
    conversation = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "bonjour"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "[echo] "}, {"type": "text", "text": "and?"}],
        },
    ]
    answer = sdk.chat.completions.create(model="teacher", messages=conversation)  # type: ignore[arg-type]
    sent = json.loads(answer.choices[0].message.content or "")
    assert sent[0]["role"] == "system" and "teacher" in sent[0]["content"].lower()
    assert sent[1:] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "bonjour"},
        {"role": "user", "content": "[echo] and?"},
    ]


def test_client_tools_come_back_to_the_client_and_their_results_go_on(
    sdk: openai.OpenAI,
) -> None:
    messages: list[dict[str, object]] = [{"role": "user", "content": "calculate 2 + 3 * 4"}]
    asked = sdk.chat.completions.create(model="assistant", messages=messages, tools=[CALCULATOR])  # type: ignore[arg-type, list-item]
    choice = asked.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "calculator"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"expression": "2 + 3 * 4"}  # type: ignore[union-attr]
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "14"},
    ]
    final = sdk.chat.completions.create(model="assistant", messages=messages, tools=[CALCULATOR])  # type: ignore[arg-type, list-item]
    assert final.choices[0].message.content == "From the tools: calculator said 14."
    assert final.choices[0].finish_reason == "stop"


def test_streamed_client_tool_calls_come_as_deltas(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="assistant",
            messages=user("calculate 1 + 1 and the time in Europe/Oslo"),  # type: ignore[arg-type]
            tools=[CALCULATOR, {**CALCULATOR, "function": {"name": "current_time"}}],  # type: ignore[list-item]
            stream=True,
        )
    )
    calls = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
    assert [(c.index, c.function.name) for c in calls] == [(0, "calculator"), (1, "current_time")]  # type: ignore[union-attr]
    assert all(c.id and c.type == "function" for c in calls)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def ask(messages: object = None, **fields: object) -> dict[str, object]:
    return {
        "model": "assistant",
        "messages": user("hi") if messages is None else messages,
        **fields,
    }


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (ask(model="nope"), 404, "model"),
        ({"messages": user("hi")}, 400, "model"),
        (ask([]), 400, "messages"),
        (ask([{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
        (ask([{"role": ["user"], "content": "x"}]), 400, "messages[0].role"),
        (ask([{"role": {"user": 1}, "content": "x"}]), 400, "messages[0].role"),
        (ask(user([{"type": "image_url"}])), 400, "messages[0].content[0]"),
        (ask([{"role": "tool", "content": "14"}]), 400, "messages[0].tool_call_id"),
        (ask(n=2), 400, "n"),
        (ask(response_format="json"), 400, "response_format"),
        (ask(response_format={"type": "xml"}), 400, "response_format"),
        (ask(response_format={"type": "json_schema"}), 400, "response_format.json_schema"),
        (
            ask(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
            400,
            "response_format.json_schema.name",
        ),
        (
            ask(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": 1}}),
            400,
            "response_format.json_schema.schema",
        ),
        (ask(temperature=7), 400, "temperature"),
        (ask(max_tokens=0), 400, "max_tokens"),
        (ask(tools=[{"type": "web"}]), 400, "tools[0]"),
        (ask(tool_choice={"function": "calc"}), 400, "tool_choice"),
        (ask(logprobs=True), 400, "logprobs"),
        (ask(top_logprobs=2), 400, "top_logprobs"),
        (ask(modalities=["text", "audio"]), 400, "modalities"),
        (ask(audio={"voice": "alloy", "format": "wav"}), 400, "audio"),
        (ask(functions=[{"name": "f", "parameters": {}}]), 400, "functions"),
        (ask(function_call={"name": "f"}), 400, "function_call"),
        (ask(web_search_options={}), 400, "web_search_options"),
        (ask(stream="yes"), 400, "stream"),
        (ask(tools=[]), 400, "tools"),
        (ask(seed=1.5), 400, "seed"),
        (ask(seed=2**63), 400, "seed"),
        (ask(parallel_tool_calls="no"), 400, "parallel_tool_calls"),
        (ask(logit_bias={"the": 5}), 400, "logit_bias"),
        (ask(logit_bias={"50256": -101}), 400, "logit_bias"),
        (ask(user("x" * 40_000)), 413, "messages"),
    ],
)  # fmt: skip
def test_a_bad_request_is_openais_error_naming_the_field_and_enqueues_nothing(
    stack: Stack, client: httpx.Client, body: dict[str, object], status: int, param: str | None
) -> None:
    before = enqueued(stack)
    response = client.post(stack.gateway.url + "/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"
    assert enqueued(stack) == before


def test_an_incomplete_upstream_answer_is_an_error_not_done(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError, match="without \\[DONE\\] or a finish reason"):
        sdk.chat.completions.create(model="assistant", messages=user("[cut]"))  # type: ignore[arg-type]
    stream = sdk.chat.completions.create(model="assistant", messages=user("[cut]"), stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError, match="incomplete"):
        list(stream)


def test_a_client_that_drops_a_stream_has_its_job_cancelled_after_the_grace(
    stack: Stack, sdk: openai.OpenAI, client: httpx.Client
) -> None:
    before = client.get(stack.llm.url + "/demo/stats").json()
    stream = sdk.chat.completions.create(
        model="assistant",
        messages=user("[long 400] [delay 0.05]"),  # type: ignore[arg-type]
        stream=True,
    )
    first = next(iter(stream))
    stream.close()
    job_id = first.id.removeprefix("chatcmpl-")
    began = time.monotonic()
    stats = lambda: client.get(stack.llm.url + "/demo/stats").json()  # noqa: E731
    wait_until(lambda: stats()["closed_early"] > before["closed_early"], 15, "the cancel")
    assert time.monotonic() - began >= 1.5  # DISCONNECT_GRACE_S is 2 in the test stack
    events = client.get(f"{stack.gateway.url}/chat/{job_id}/events").text
    assert '"error":"cancelled: every reader disconnected"' in events
