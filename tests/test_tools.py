"""The worker's tools: schemas from signatures, the calculator's bounds, the registry's errors."""

from __future__ import annotations

import asyncio
import math
import operator
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import Field

from worker.tools import BUILTIN_TOOLS, FunctionTool, ToolRegistry
from worker.tools.calculator import (
    MAX_EXPRESSION_CHARS,
    CalculatorError,
    calculator,
    evaluate,
    format_number,
)
from worker.tools.current_time import UnknownTimezoneError, current_time
from worker.tools.loading import builtin_tools


def _registry(*funcs: Callable[..., Any], timeout_s: float = 5) -> ToolRegistry:
    return ToolRegistry([FunctionTool(f) for f in funcs], timeout_s=timeout_s)


# --- schemas ------------------------------------------------------------------------------


def _function(registry: ToolRegistry, name: str) -> dict[str, Any]:
    [schema] = [s for s in registry.schemas() if s["function"]["name"] == name]
    assert schema["type"] == "function"
    function: dict[str, Any] = schema["function"]
    return function


def test_builtin_schemas_are_derived_from_the_signatures() -> None:
    registry = _registry(*BUILTIN_TOOLS)
    assert registry.names() == ["calculator", "current_time"]

    calc = _function(registry, "calculator")
    assert calc["description"].startswith("Evaluate an arithmetic expression")
    assert calc["parameters"]["type"] == "object"
    assert calc["parameters"]["required"] == ["expression"]
    assert calc["parameters"]["properties"]["expression"]["type"] == "string"
    assert "description" in calc["parameters"]["properties"]["expression"]

    clock = _function(registry, "current_time")
    assert "required" not in clock["parameters"]
    assert clock["parameters"]["properties"]["timezone"]["default"] == "UTC"
    assert clock["parameters"]["properties"]["timezone"]["type"] == "string"


def test_a_new_tool_needs_only_a_typed_documented_function() -> None:
    def convert(
        value: float,
        unit: Literal["m", "ft"],
        digits: Annotated[int, Field(description="Decimals to keep.")] = 2,
    ) -> str:
        """Convert a length.

        Only this first paragraph reaches the model.
        """
        return str(round(value, digits)) + unit

    parameters = _function(_registry(convert), "convert")["parameters"]
    assert _function(_registry(convert), "convert")["description"] == "Convert a length."
    assert parameters["required"] == ["value", "unit"]
    assert parameters["properties"]["value"]["type"] == "number"
    assert parameters["properties"]["unit"]["enum"] == ["m", "ft"]
    assert parameters["properties"]["digits"] == {
        "default": 2,
        "description": "Decimals to keep.",
        "type": "integer",
    }
    assert parameters["additionalProperties"] is False


def test_tools_without_docstring_or_types_or_unique_names_are_refused() -> None:
    def undocumented(x: int) -> str:
        return str(x)

    def untyped(x) -> str:  # type: ignore[no-untyped-def]
        """Untyped."""
        return str(x)

    with pytest.raises(ValueError, match="docstring"):
        _registry(undocumented)
    with pytest.raises(ValueError, match="needs a type"):
        _registry(untyped)
    # Both named, with where each comes from: the start's one line is all a user sees.
    with pytest.raises(
        ValueError, match=r"two tools are named 'calculator': .*calculator\.calculator\) and"
    ):
        _registry(calculator, calculator)


# --- calculator ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2 + 3 * 4", "14"),
        ("7/2", "3.5"),
        ("8/2", "4"),
        ("7 // 2", "3"),
        ("-7 % 3", "2"),
        ("-(2 + 3)", "-5"),
        ("+4", "4"),
        ("2 ** 10", "1024"),
        ("2 ** -1", "0.5"),
        ("(1.5 + 2) ** 2", "12.25"),
        ("0.1 + 0.2", "0.3"),
        ("1_000 * 3", "3000"),
        ("2 ** 100", str(2**100)),
        ("1e20", "1e+20"),
        ("-0.0", "0"),
        ("  (1 +\n 2)  ", "3"),
        ("(-1) ** (10 ** 3000)", "1"),
    ],
)
def test_calculator_values(expression: str, value: str) -> None:
    assert calculator(expression) == value


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("x + 1", "'x' is not allowed"),
        ("e", "names"),
        ("e(1)", "function calls"),
        ("1e5.e", "attribute access"),
        ("abs(-1)", "'a' is not allowed"),
        ("(1).real", "'r' is not allowed"),
        ("__import__('os').system('true')", "is not allowed"),
        ("lambda: 1", "is not allowed"),
        ("1 < 2", "'<' is not allowed"),
        ("1 == 1", "'=' is not allowed"),
        ("'1' + '2'", "is not allowed"),
        ("()", "tuples"),
        ("1 << 2", "is not allowed"),
        ("9**9**9", "more than 4000 digits"),
        ("10**100000", "more than 4000 digits"),
        ("10**4000", "more than 4000 digits"),
        ("(10**2000) * (10**2000)", "more than 4000 digits"),
        ("2.0 ** 100000", "too large"),
        ("1e308 * 10", "too large"),
        ("1e999", "too large"),
        ("10**3000 / 3", "too large"),
        ("1 / 0", "division by zero"),
        ("1 // 0", "division by zero"),
        ("1 % 0.0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("", "empty"),
        ("2 +", "not a valid arithmetic expression"),
        ("(" * 201 + "1" + ")" * 201, "not a valid arithmetic expression"),
        ("1" * (MAX_EXPRESSION_CHARS + 1), "the limit is 500"),
    ],
)
def test_calculator_refusals(expression: str, reason: str) -> None:
    started = time.perf_counter()
    with pytest.raises(CalculatorError, match=re.escape(reason)):
        calculator(expression)
    assert time.perf_counter() - started < 0.5  # refused by bounds, not by running long


# Each generated expression comes with the value Python's own operators give it.
Expr = tuple[str, int | float]

_BINARY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
}


def _literal(value: int | float) -> Expr:
    text = repr(value)
    return (f"({text})" if text.startswith("-") else text), value


@st.composite
def _operation(draw: st.DrawFn, children: st.SearchStrategy[Expr]) -> Expr:
    """One unary or binary operation over generated operands; its value by Python itself."""
    left_text, left = draw(children)
    op = draw(st.sampled_from(["u+", "u-", *_BINARY_OPS, "**"]))
    if op == "u+":
        return f"(+{left_text})", +left
    if op == "u-":
        return f"(-{left_text})", -left
    right_text, right = draw(children | st.integers(0, 4).map(_literal))
    ints = isinstance(left, int) and isinstance(right, int)
    if op == "**" and ints and abs(left) > 1 and right * math.log10(abs(left)) > 300:
        return left_text, left  # keep the reference cheap: no power past ~300 digits
    function = operator.pow if op == "**" else _BINARY_OPS[op]
    try:
        value = function(left, right)
    except (ZeroDivisionError, OverflowError):
        return left_text, left
    if isinstance(value, complex) or (isinstance(value, float) and not math.isfinite(value)):
        return left_text, left
    return f"({left_text} {op} {right_text})", value


_numbers: st.SearchStrategy[Expr] = st.one_of(
    st.integers(-(10**6), 10**6).map(_literal),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False).map(_literal),
)
_expressions = st.recursive(_numbers, _operation, max_leaves=8)


@given(_expressions)
def test_calculator_agrees_with_python_arithmetic(expr: Expr) -> None:
    text, expected = expr
    assume(len(text) <= MAX_EXPRESSION_CHARS)
    value = evaluate(text)
    assert type(value) is type(expected)
    assert value == expected
    assert calculator(text) == format_number(expected)
    if isinstance(expected, float):
        assert math.isclose(float(calculator(text)), expected, rel_tol=1e-14)


@settings(deadline=timedelta(milliseconds=500), max_examples=300)
@given(st.text(max_size=MAX_EXPRESSION_CHARS + 20) | st.text("0123456789.eE_+-*/%() ", max_size=60))
def test_calculator_never_raises_anything_but_its_own_error(text: str) -> None:
    try:
        result = calculator(text)
    except CalculatorError:
        return
    assert isinstance(result, str)


# --- current_time -------------------------------------------------------------------------

_ISO_SECONDS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$")


def test_current_time_defaults_to_utc() -> None:
    text = current_time()
    assert _ISO_SECONDS.match(text)
    assert text.endswith("+00:00")
    assert abs(datetime.fromisoformat(text) - datetime.now(UTC)) < timedelta(seconds=5)


@pytest.mark.parametrize("zone", ["Asia/Kolkata", "asia/kolkata", " Asia/Kolkata "])
def test_current_time_in_a_zone(zone: str) -> None:
    text = current_time(zone)
    assert _ISO_SECONDS.match(text)
    assert text.endswith("+05:30")  # no daylight saving there, so the offset is fixed


def test_current_time_offset_follows_daylight_saving() -> None:
    moment = datetime.fromisoformat(current_time("Europe/Oslo"))
    assert moment.utcoffset() == moment.astimezone(ZoneInfo("Europe/Oslo")).utcoffset()


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "", "America", "../etc/passwd", "a\0b"])
def test_current_time_refuses_unknown_zones(zone: str) -> None:
    with pytest.raises(UnknownTimezoneError, match="unknown time zone"):
        current_time(zone)


# --- the registry -------------------------------------------------------------------------


async def nap(seconds: float) -> str:
    """Sleep, then say so."""
    await asyncio.sleep(seconds)
    return "rested"


def add(a: int, b: int) -> int:
    """Add two integers (returns an int, which the registry turns into text)."""
    return a + b


def refuse(reason: str) -> str:
    """Refuse, with a reason."""
    raise ValueError(reason)


def crash() -> str:
    """Fail the way a bug does."""
    raise RuntimeError("boom")


@pytest.fixture
def registry() -> ToolRegistry:
    return _registry(*BUILTIN_TOOLS, nap, add, refuse, crash)


@pytest.mark.asyncio
async def test_run_calls_sync_and_async_tools(registry: ToolRegistry) -> None:
    run = await registry.run("calculator", '{"expression": "2 + 3 * 4"}')
    assert (run.ok, run.output, run.arguments) == (True, "14", {"expression": "2 + 3 * 4"})
    run = await registry.run("add", '{"a": 2, "b": "3"}')
    assert (run.ok, run.output) == (True, "5")
    run = await registry.run("nap", '{"seconds": 0}')
    assert (run.ok, run.output) == (True, "rested")
    run = await registry.run("current_time", "")  # empty means no arguments
    assert run.ok and run.output.endswith("+00:00") and run.arguments == {}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("name", "arguments", "parsed", "says"),
    [
        ("weather", '{"city": "Oslo"}', {"city": "Oslo"}, "no tool named 'weather'"),
        ("calculator", '{"expression": "1+', '{"expression": "1+', "not valid JSON"),
        ("calculator", "[1, 2]", "[1, 2]", "must be a JSON object"),  # as sent: no object
        # JSON Python reads and no event can carry (a 100-bit number): shown as sent
        ("calculator", f'{{"expression": {2**100}}}', f'{{"expression": {2**100}}}', "cannot be"),
        ("calculator", "{}", {}, "expression: Field required"),
        ("calculator", '{"expression": 7}', {"expression": 7}, "valid string"),
        ("add", '{"a": 1, "b": "two"}', {"a": 1, "b": "two"}, "b: Input should be a valid"),
        ("current_time", '{"tz": "UTC"}', {"tz": "UTC"}, "tz: Extra inputs"),
        ("current_time", '{"timezone": "Mars/Base"}', {"timezone": "Mars/Base"}, "Mars/Base"),
        ("calculator", '{"expression": "x"}', {"expression": "x"}, "'x' is not allowed"),
        ("refuse", '{"reason": "no way"}', {"reason": "no way"}, "no way"),
        ("crash", "{}", {}, "crash failed unexpectedly (RuntimeError)"),
    ],
)
async def test_run_turns_every_problem_into_an_error_output(
    registry: ToolRegistry, name: str, arguments: str, parsed: Any, says: str
) -> None:
    run = await registry.run(name, arguments)
    assert not run.ok
    assert run.output.startswith("error: ")
    assert says in run.output
    assert run.arguments == parsed


@pytest.mark.asyncio
async def test_text_no_utf8_carries_comes_out_well_formed(registry: ToolRegistry) -> None:
    """A model may send a lone surrogate's escape (valid JSON): the tool gets it as U+FFFD,
    and so do the event and the next request upstream (neither could carry it)."""
    run = await registry.run("calculator", '{"expression": "\\ud800"}')
    assert run.arguments == {"expression": "\ufffd"} and not run.ok
    run = await registry.run("refuse", '{"reason": "x\\udc00"}')
    assert run.output == "error: x\ufffd"


@pytest.mark.asyncio
async def test_run_stops_waiting_for_a_slow_async_tool(registry: ToolRegistry) -> None:
    started = time.perf_counter()
    registry.timeout_s = 0.05
    run = await registry.run("nap", '{"seconds": 30}')
    assert time.perf_counter() - started < 1
    assert not run.ok
    assert run.output == "error: nap did not finish within 0.05 s"


@pytest.mark.asyncio
async def test_run_stops_waiting_for_a_slow_sync_tool() -> None:
    release = threading.Event()

    def stuck() -> str:
        """Block until released."""
        release.wait(10)
        return "late"

    try:
        run = await _registry(stuck, timeout_s=0.05).run("stuck", "{}")
    finally:
        release.set()  # let the thread end; it cannot be killed
    assert not run.ok
    assert run.output == "error: stuck did not finish within 0.05 s"


@pytest.mark.asyncio
async def test_run_lets_cancellation_through(registry: ToolRegistry) -> None:
    registry.timeout_s = 60
    task = asyncio.create_task(registry.run("nap", '{"seconds": 30}'))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- builtin_tools (the TOOLS setting) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "names"),
    [
        ("", []),
        ("none", []),
        (" NONE ", []),
        ("*", ["calculator", "current_time"]),
        ("all", ["calculator", "current_time"]),
        ("calculator", ["calculator"]),
        (" current_time , calculator ,", ["current_time", "calculator"]),
        ("calculator,calculator", ["calculator"]),
    ],
)
def test_from_setting(setting: str, names: list[str]) -> None:
    assert [tool.name for tool in builtin_tools(setting)] == names


def test_from_setting_names_an_unknown_tool() -> None:
    with pytest.raises(ValueError, match="'weather'"):
        builtin_tools("calculator, weather")
