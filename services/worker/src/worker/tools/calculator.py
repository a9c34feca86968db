"""The ``calculator`` tool: arithmetic the model can trust, on text it cannot.

Decisions worth knowing before changing them:

- Never ``eval``. The expression is parsed with :func:`ast.parse` and walked by a small
  evaluator that knows only numbers, ``+ - * / // % **``, unary ``+``/``-`` and
  parentheses; any other node is refused by name.
- Before parsing, every character must be one that arithmetic needs (ASCII digits, ``.``,
  ``_``, ``e``/``E``, operators, parentheses, whitespace). So no string literal ever reaches
  the parser (whose escape-sequence warnings would leak out), and the error names the
  offending character, which is what the model needs to fix its call.
- Work is bounded by refusing, not by timing out: the expression is at most
  ``MAX_EXPRESSION_CHARS`` long, a power is refused before it is computed when its result
  would pass ``MAX_DIGITS`` digits, and every intermediate integer is held to that size.
  So each step costs microseconds to milliseconds and no input can hang a worker thread.
  (``MAX_DIGITS`` stays under CPython's 4300-digit ``int`` to ``str`` limit.)
- Integers stay exact (``2**100`` prints all 31 digits). Floats print with 15 significant
  digits (``format(x, ".15g")``): whole floats lose their ``.0`` (``8/2`` is ``4``), binary
  noise is trimmed (``0.1 + 0.2`` is ``0.3``) and large or tiny ones use an exponent
  (``1e+20``). Infinity, NaN and complex results are refused.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

MAX_EXPRESSION_CHARS = 500
MAX_DIGITS = 4000

_INT_LIMIT = 10**MAX_DIGITS
_ALLOWED_CHARS = frozenset("0123456789._eE+-*/%() \t\r\n")

Number = int | float

# Any: `**` may return a complex, which `_checked` refuses.
_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}

# Friendlier names for the nodes a model is most likely to try.
_REFUSED_NODES: dict[type[ast.AST], str] = {
    ast.Name: "names",
    ast.Attribute: "attribute access",
    ast.Call: "function calls",
    ast.Compare: "comparisons",
    ast.BoolOp: "boolean operators",
    ast.Lambda: "lambda",
    ast.Tuple: "tuples (commas)",
    ast.Subscript: "subscripts",
}


class CalculatorError(ValueError):
    """The expression is not arithmetic the calculator accepts; the message says why."""


def calculator(
    expression: Annotated[
        str,
        Field(description="Arithmetic to evaluate, e.g. '2 + 3 * 4' or '(1.5 + 2) ** 2 / 7'."),
    ],
) -> str:
    """Evaluate an arithmetic expression and return its value as text.

    Supports numbers, + - * / // % ** and parentheses; no names or functions.
    """
    return format_number(evaluate(expression))


def evaluate(expression: str) -> Number:
    """The value of ``expression``; raises :class:`CalculatorError` for anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(
            f"the expression is {len(expression)} characters long; "
            f"the limit is {MAX_EXPRESSION_CHARS}"
        )
    for char in expression:
        if char not in _ALLOWED_CHARS:
            raise CalculatorError(
                f"{char!r} is not allowed: the calculator takes numbers, "
                "+ - * / // % ** and parentheses only"
            )
    if not expression.strip():
        raise CalculatorError("the expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        detail = exc.msg if isinstance(exc, SyntaxError) else "too deeply nested"
        raise CalculatorError(f"not a valid arithmetic expression ({detail})") from None
    try:
        return _eval(tree.body)
    except RecursionError:
        raise CalculatorError("the expression is too deeply nested") from None


def format_number(value: Number) -> str:
    """Integers exactly; floats to 15 significant digits, whole ones without ``.0``."""
    if isinstance(value, int):
        return str(value)
    return format(value + 0.0, ".15g")  # + 0.0 turns -0.0 into 0.0


def _eval(node: ast.expr) -> Number:
    if isinstance(node, ast.Constant):
        value = node.value
        # bool is an int subclass, but `True` is a name to a reader; refuse it.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CalculatorError(f"{value!r} is not a number")
        return _checked(value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        operand = _eval(node.operand)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError(
                "a number is too large for floating point (limit about 1.8e308)"
            ) from None
        return _checked(result)
    if isinstance(node, ast.BinOp):
        raise CalculatorError(f"the operator {type(node.op).__name__} is not supported")
    what = _REFUSED_NODES.get(type(node), type(node).__name__)
    raise CalculatorError(f"not allowed: {what}; the calculator does arithmetic on numbers only")


def _check_power(base: Number, exponent: Number) -> None:
    """Refuse an integer power whose result would pass ``MAX_DIGITS`` before computing it.

    Float powers need no guard: they cost the same whatever the operands and overflow
    raises ``OverflowError``, which the caller turns into an error.
    """
    if not (isinstance(base, int) and isinstance(exponent, int)) or exponent <= 0:
        return
    if abs(base) <= 1:
        return  # 0, 1 and -1 stay small whatever the exponent
    if exponent > MAX_DIGITS * 4 or exponent * math.log10(abs(base)) > MAX_DIGITS + 1:
        raise CalculatorError(f"the result would have more than {MAX_DIGITS} digits")


def _checked(value: Number | complex) -> Number:
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number")
    if isinstance(value, int) and abs(value) >= _INT_LIMIT:
        raise CalculatorError(f"the result would have more than {MAX_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is too large")
    return value
