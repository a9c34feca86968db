"""A small custom agent for Streamgate: answer from a team's FAQ first, then let the model
phrase it.

Run it with ``AGENT=faq_agent:answer`` and this folder on ``PYTHONPATH``. It looks the
question up in ``FAQ`` (shown to the user as a tool call), puts what it found in front of
the model, and streams the model's answer. Streamgate does the rest: the queue, publishing,
the final event, resuming readers, cancelling (an ``await`` here raises ``CancelledError``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from worker.agents import (
    AgentError,
    AgentRequest,
    Done,
    Token,
    ToolCallStarted,
    ToolResult,
    ToolsCalled,
    Usage,
)
from worker.llm import Finish, TextDelta

FAQ = {
    "refund": "Refunds are paid within 14 days to the card used for the purchase.",
    "shipping": "Orders ship within 2 working days; tracking comes by e-mail.",
    "password": "Reset a password from the sign-in page with 'Forgot password'.",
}


def lookup(question: str) -> str:
    words = set(re.findall(r"[a-z]+", question.lower()))
    found = [answer for topic, answer in FAQ.items() if topic in words]
    return " ".join(found) or "nothing in the FAQ"


async def answer(
    request: AgentRequest,
) -> AsyncIterator[Token | ToolCallStarted | ToolsCalled | Done]:
    question = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), None)
    if not isinstance(question, str):
        raise AgentError("the FAQ agent answers text questions only")
    call_id = f"faq_{request.job_id}"
    yield ToolCallStarted(call_id, "faq_lookup")
    found = lookup(question)
    yield ToolsCalled([ToolResult(call_id, "faq_lookup", {"question": question}, found)])

    messages = [
        *request.messages[:-1],
        {"role": "system", "content": f"The FAQ says: {found}"},
        request.messages[-1],
    ]
    finish, usage = None, None
    async for delta in request.llm.stream(messages, params=request.params):
        if isinstance(delta, TextDelta):
            yield Token(delta.text)
        elif isinstance(delta, Finish):
            finish = delta.reason
        elif isinstance(delta, Usage):
            usage = delta
    yield Done(finish, usage)
