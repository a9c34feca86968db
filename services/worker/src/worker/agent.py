"""The built-in agent, the OpenAI tool loop: stream the model, run the tools it calls,
stream its next answer.

Tool calls arrive as deltas: the first piece of each has its id and name (``tool_call`` is
published then), later pieces add slices of the arguments, several calls interleaved by
``index``. Some servers (Ollama) omit the index or reuse 0 for parallel calls, so a new id
at a known index starts a new call. When the model stops to call tools, all calls run at
once, each with a timeout, and one ``tools_called`` event reports them before the results go
back as ``role: tool`` messages. A model that keeps calling tools is stopped after
``max_rounds`` rounds with an error, rather than looping (and billing) forever.

A request that declares its own tools (the OpenAI API's ``tools``) is offered those alone,
and the model's calls of them end the job: one ``client_tool_calls`` event carries them
back, for the client to run and send the results in its next request, as with OpenAI.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from shared import events as ev

from .agents import AgentRequest
from .llm import Finish, Opening, TextDelta, ToolCallAssembler, ToolCallDelta, UpstreamError
from .metrics import WorkerMetrics
from .tools.registry import parse_arguments

NOT_RUN = "error: not run: the model was still calling tools at the last round (MAX_TOOL_ROUNDS)"


class TooManyRounds(UpstreamError):
    """The model was still calling tools when the round limit came."""


class OpenAIAgent:
    """The default agent (``agents.py``'s interface): the OpenAI tool loop."""

    def __init__(self, max_rounds: int, metrics: WorkerMetrics) -> None:
        self.max_rounds = max_rounds
        self.metrics = metrics

    async def __call__(
        self, request: AgentRequest, opened: Opening | None = None
    ) -> AsyncIterator[ev.Event]:
        """Run the conversation to the model's final answer (or, with client tools, to its
        calls of them). ``opened``: the first request, already sent for these messages."""
        upstream, messages, client_tools = request.llm, request.messages, request.client_tools
        schemas = client_tools or request.tools.schemas() or None
        usage: ev.Usage | None = ev.Usage(0, 0, 0)
        for round_number in range(self.max_rounds + 1):
            text: list[str] = []
            assembler = ToolCallAssembler()
            sent_at: float | None = time.monotonic()
            sent, opened = opened, None  # only the first round's request was sent ahead
            finish: str | None = None
            reported: ev.Usage | None = None
            request.spent = None  # a request in flight: what it costs is unknown until it ends
            async for delta in upstream.stream(messages, schemas, sent, request.params):
                if sent_at is not None:
                    self.metrics.upstream_first_token.observe(time.monotonic() - sent_at)
                    sent_at = None
                if isinstance(delta, TextDelta):
                    text.append(delta.text)
                    yield ev.Token(delta.text)
                elif isinstance(delta, ToolCallDelta):
                    started = assembler.add(delta)
                    if started is not None:
                        yield ev.ToolCallStarted(started.call_id, started.name)
                elif isinstance(delta, Finish):
                    finish = delta.reason
                else:
                    reported = delta
            usage = usage + reported if usage is not None and reported is not None else None
            request.spent = usage
            if not assembler.calls:
                yield ev.Done(finish, usage)
                return
            if client_tools:
                asked = [
                    ev.ClientToolCall(c.call_id, c.name, "".join(c.arguments))
                    for c in assembler.calls
                ]
                yield ev.ClientToolCalls(asked)
                yield ev.Done("tool_calls", usage)
                return
            if round_number == self.max_rounds:
                # Announced, never run: each still gets its result, so no call stays open.
                yield ev.ToolsCalled(
                    [
                        ev.ToolResult(
                            c.call_id, c.name, parse_arguments("".join(c.arguments))[0], NOT_RUN
                        )
                        for c in assembler.calls
                    ]
                )
                break
            calls = assembler.calls
            runs = await asyncio.gather(
                *(request.tools.run(c.name, "".join(c.arguments), c.call_id) for c in calls)
            )
            yield ev.ToolsCalled(
                [
                    ev.ToolResult(c.call_id, c.name, r.arguments, r.output)
                    for c, r in zip(calls, runs, strict=True)
                ]
            )
            messages.append(
                {
                    "role": "assistant",
                    "content": "".join(text) or None,
                    "tool_calls": [
                        {
                            "id": c.call_id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": "".join(c.arguments)},
                        }
                        for c in calls
                    ],
                }
            )
            messages += [
                {"role": "tool", "tool_call_id": c.call_id, "content": r.output}
                for c, r in zip(calls, runs, strict=True)
            ]
        raise TooManyRounds(
            f"the model was still calling tools after {self.max_rounds} rounds"
            " (MAX_TOOL_ROUNDS); stopped without a final answer",
            "tool_rounds",
        )
