"""The official ``openai`` npm package (Node) against the gateway: a streamed chat completion
and a streamed background response, installed from the npm registry in the test's folder."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from demo_llm.scripts import HARD_TOKENS

from .harness import ROOT, Stack

NODE = ROOT / "tests" / "node"


@pytest.mark.skipif(shutil.which("npm") is None, reason="Node and npm are needed")
def test_the_openai_npm_package_streams_a_completion_and_a_background_response(
    stack: Stack, tmp_path: Path
) -> None:
    for name in ("package.json", "package-lock.json", "openai_client.mjs"):
        shutil.copy(NODE / name, tmp_path / name)
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"], cwd=tmp_path, check=True, capture_output=True
    )
    done = subprocess.run(
        ["node", "openai_client.mjs", stack.gateway.url + "/v1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["text"] == "".join(HARD_TOKENS)
    assert seen["usage"]["completion_tokens"] == len(HARD_TOKENS)
    expected = "".join(f"t{i} " for i in range(30))
    assert seen["deltas"] == expected and seen["output"] == expected
    assert seen["types"][0] == "response.created" and seen["types"][-1] == "response.completed"
    assert seen["status"] == "completed"
