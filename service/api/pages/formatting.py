"""Escaping and number formatting shared by the page and its charts."""

from __future__ import annotations

import html
import math
from typing import Any


def esc(value: Any) -> str:
    """Text for HTML and SVG, attributes included: everything user-controlled goes through
    here (model, layer, parameter and input names, messages, error texts)."""
    return html.escape("" if value is None else str(value), quote=True)


def as_float(value: Any) -> float | None:
    """A report number: floats, ints, or the strings "inf", "-inf", "nan" that non-finite
    values are stored as (report.to_jsonable); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.lower() in ("inf", "-inf", "nan", "+inf"):
        return float(value)
    return None


def num(value: Any) -> str:
    """A figure as people read it: 3 significant digits, scientific outside [1e-3, 1e5)."""
    number = as_float(value)
    if number is None:
        return "—" if value is None else str(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "∞" if number > 0 else "−∞"
    if number == 0:
        return "0"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**9:
        return f"{value:,}"
    magnitude = abs(number)
    if magnitude < 1e-3 or magnitude >= 1e5:
        return f"{number:.2e}"
    return f"{number:.3g}"


def seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"
