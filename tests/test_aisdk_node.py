"""The AI SDK's own ``DefaultChatTransport`` (npm ``ai``, what ``useChat`` uses) against two
gateways: parts of an answer with a tool call, a stream dropped mid-answer and resumed on
the other gateway, and 204 once nothing is active."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .harness import ROOT, Stack

NODE = ROOT / "tests" / "node"


@pytest.mark.skipif(shutil.which("npm") is None, reason="Node and npm are needed")
def test_default_chat_transport_streams_and_resumes_on_another_gateway(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    stack = make_stack(gateways=2)
    for name in ("package.json", "package-lock.json", "aisdk_client.mjs"):
        shutil.copy(NODE / name, tmp_path / name)
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"], cwd=tmp_path, check=True, capture_output=True
    )
    first, second = (g.url for g in stack.gateways)
    done = subprocess.run(
        ["node", "aisdk_client.mjs", first, second],
        cwd=tmp_path, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)

    tool: list[dict[str, Any]] = seen["tool"]
    types = [c["type"] for c in tool]
    assert types[:2] == ["start", "start-step"] and types[-2:] == ["finish-step", "finish"]
    assert tool[-1]["finishReason"] == "stop"
    [started] = [c for c in tool if c["type"] == "tool-input-start"]
    [given] = [c for c in tool if c["type"] == "tool-input-available"]
    [output] = [c for c in tool if c["type"] == "tool-output-available"]
    assert started["toolName"] == given["toolName"] == "calculator"
    assert started["toolCallId"] == given["toolCallId"] == output["toolCallId"]
    assert given["input"] == {"expression": "2 + 3 * 4"} and output["output"] == "14"
    assert started["dynamic"] is True and started["providerExecuted"] is True
    assert types.index("tool-output-available") < types.index("text-start")
    assert seen["toolText"] == "From the tools: calculator said 14."

    expected = "".join(f"t{i} " for i in range(200))
    assert seen["headText"] == expected[: len(seen["headText"])] and seen["headText"]
    assert seen["resumedText"] == expected  # the whole answer, once, on the other gateway
    assert seen["resumed"][-1]["type"] == "finish"
    assert seen["afterEnd"] == "none"
