"""``python -m demo_llm``: serve the demo model on $PORT (default 8001)."""

from __future__ import annotations

import argparse
import gc
import os
import sys

import uvicorn

from .app import create_app
from .settings import DELAY_S_DEFAULT, delay_problem, number_problem


def _setting(
    name: str, default: str, kind: type[float] | type[int], low: float, high: float
) -> float:
    raw = os.environ.get(name) or default
    _stop_if(number_problem(name, raw, kind, low, high))
    return kind(raw)


def _stop_if(problem: str | None) -> None:
    if problem:
        sys.exit(f"demo LLM cannot start: invalid setting(s)\n  {problem}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Streamgate's demo OpenAI-compatible LLM")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    port = args.port or int(_setting("PORT", "8001", int, 1, 65535))
    delay = os.environ.get("DEMO_LLM_DELAY_S") or ""
    _stop_if(delay_problem(delay))  # the check scripts/run makes too
    app = create_app(float(delay or DELAY_S_DEFAULT))
    # As the gateway does (shared/gc_tuning.py, not a dependency here): with thousands of
    # streams open, a full collection would pause every stream for a few hundred ms.
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    uvicorn.run(app, host=args.host, port=port, log_level="warning")


if __name__ == "__main__":
    main()
