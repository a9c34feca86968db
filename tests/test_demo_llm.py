"""The demo LLM's directives: bad numbers are 400s, and no prompt makes it hold much."""

from __future__ import annotations

import tracemalloc

import pytest
from starlette.testclient import TestClient

from demo_llm.app import create_app
from demo_llm.scripts import plan


def ask(prompt: str, stream: bool = False) -> tuple[int, dict[str, object] | str]:
    with TestClient(create_app(0)) as client:
        body = {"messages": [{"role": "user", "content": prompt}], "stream": stream}
        response = client.post("/v1/chat/completions", json=body)
        if stream and response.status_code == 200:
            return 200, response.text
        return response.status_code, response.json()


@pytest.mark.parametrize(
    ("prompt", "said"),
    [
        ("[long 1.5]", "[long N]: N must be a whole number from 1 to 10,000,000"),
        ("[long 0]", "[long N]: N must be a whole number"),
        ("[long 99999999999]", "[long N]: N must be a whole number"),
        ("[delay .]", "[delay N]: N must be a number from 0 to 60"),
        ("[delay nan]", "[delay N]: N must be a number"),
        ("[wait -1]", "[wait N]: N must be a number from 0 to 3600"),
        ("[http 7]", "[http N]: N must be a whole number from 400 to 599"),
        ("[hard 3]", "[hard] takes no number"),
        ("[long \u0661\u0662]", "[long N]: N must be a whole number"),  # Arabic-Indic 12
    ],
)
def test_a_bad_directive_is_a_400_naming_it(prompt: str, said: str) -> None:
    status, body = ask(prompt)
    assert status == 400
    assert isinstance(body, dict)
    assert body["error"]["message"].startswith(said)  # type: ignore[index]


def test_long_answers_are_made_as_they_are_sent() -> None:
    tracemalloc.start()
    try:
        script = plan([{"role": "user", "content": "[long 3000000]"}], 0)
        assert len(script.tokens) == 3_000_000
        assert script.tokens[2_999_999] == "t2999999 "
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} bytes for a plan"


def test_long_streams_its_numbered_tokens() -> None:
    status, text = ask("[long 3]", stream=True)
    assert status == 200
    assert isinstance(text, str)
    assert all(f'"content":"t{i} "' in text for i in range(3))
