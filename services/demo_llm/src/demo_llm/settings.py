"""The demo LLM's settings, checked here and by scripts/run before it starts anything."""

from __future__ import annotations

DELAY_S_DEFAULT = "0.03"


def number_problem(
    name: str, raw: str, kind: type[float] | type[int], low: float, high: float
) -> str | None:
    """What is wrong with a number setting's text, in words; None when it is good."""
    try:
        if low <= kind(raw) <= high:
            return None
    except ValueError:
        pass
    return f"{name}: got {raw!r}; use a number from {low:g} to {high:g}"


def delay_problem(raw: str) -> str | None:
    """``DEMO_LLM_DELAY_S`` (empty: the default): seconds between tokens, 0 to 60."""
    return number_problem("DEMO_LLM_DELAY_S", raw or DELAY_S_DEFAULT, float, 0, 60)
