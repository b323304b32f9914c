"""Inline SVG charts drawn in Python: a log-scale profile (one point per layer or time step)
and a 0–1 bar chart (one bar per layer), each with threshold lines.

No JavaScript: hovering a point shows its SVG <title> in any browser. Every marker carries
`class="pt"` and `data-label` so tests can count them; every label is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.api.pages.formatting import esc, num

WIDTH = 860
LEFT, RIGHT, TOP = 70, 170, 18
PLOT_HEIGHT, BARS_PLOT_HEIGHT = 250, 190
BOTTOM_INDEX = 44
SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
MAX_NAME_LABELS = 40  # more layers than this: every k-th name under the axis
NAME_CHARS = 16
MAX_DECADE_TICKS = 9


@dataclass(frozen=True)
class Point:
    label: str
    value: float | None  # None: not measured
    highlight: bool = False  # named by a finding


@dataclass(frozen=True)
class Threshold:
    value: float
    label: str
    level: str  # "warning" | "error"


def _bottom(points: Sequence[Point], by_index: bool) -> int:
    """Room under the plot for the x labels: rotated names need about 4 px per character."""
    if by_index:
        return BOTTOM_INDEX
    longest = max((len(p.label) for p in points), default=1)
    return 40 + int(4.2 * min(longest, NAME_CHARS))


@dataclass(frozen=True)
class _Frame:
    n: int
    bottom: int
    plot_h: float = PLOT_HEIGHT

    @property
    def plot_w(self) -> float:
        return WIDTH - LEFT - RIGHT

    @property
    def height(self) -> float:
        return TOP + self.plot_h + self.bottom

    @property
    def radius(self) -> int:
        return 4 if self.n <= 40 else 3 if self.n <= 100 else 2

    @property
    def base_y(self) -> float:
        return TOP + self.plot_h

    def x(self, index: int) -> float:
        return LEFT + (index + 0.5) * self.plot_w / self.n


def _open(title: str, frame: _Frame, css_class: str) -> list[str]:
    return [
        f'<svg class="chart {css_class}" viewBox="0 0 {WIDTH} {frame.height:.0f}" '
        f'width="{WIDTH}" height="{frame.height:.0f}" role="img" aria-label="{esc(title)}" '
        'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{esc(title)}</title>",
        f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{frame.plot_w:.1f}" '
        f'height="{frame.plot_h:.1f}"/>',
    ]


def _x_axis(points: Sequence[Point], frame: _Frame, x_title: str, by_index: bool) -> list[str]:
    parts = []
    n = len(points)
    if by_index:
        step = max(1, math.ceil(n / 12))
        for i in range(0, n, step):
            parts.append(
                f'<text class="tick" x="{frame.x(i):.1f}" y="{frame.base_y + 16:.1f}" '
                f'text-anchor="middle">{esc(points[i].label)}</text>'
            )
        title_y = frame.base_y + 36
    else:
        step = max(1, math.ceil(n / MAX_NAME_LABELS))
        for i in range(0, n, step):
            name = points[i].label
            short = name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "…"
            x, y = frame.x(i), frame.base_y + 10
            parts.append(
                f'<text class="tick name" x="{x:.1f}" y="{y:.1f}" text-anchor="end" '
                f'transform="rotate(-40 {x:.1f} {y:.1f})"><title>{esc(name)}</title>'
                f"{esc(short)}</text>"
            )
        title_y = frame.height - 6
    parts.append(
        f'<text class="axis-title" x="{LEFT + frame.plot_w / 2:.1f}" y="{title_y:.1f}" '
        f'text-anchor="middle">{esc(x_title)}</text>'
    )
    return parts


def _y_title(y_title: str, frame: _Frame) -> str:
    y = TOP + frame.plot_h / 2
    return (
        f'<text class="axis-title" x="16" y="{y:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 16 {y:.1f})">{esc(y_title)}</text>'
    )


def _threshold_line(y: float, line: Threshold) -> list[str]:
    x_end = WIDTH - RIGHT
    return [
        f'<line class="threshold {line.level}" x1="{LEFT}" x2="{x_end}" '
        f'y1="{y:.1f}" y2="{y:.1f}"/>',
        f'<text class="threshold-label {line.level}" x="{x_end + 6}" y="{y + 4:.1f}">'
        f"{esc(line.label)}</text>",
    ]


def _decades(values: Sequence[float]) -> tuple[int, int]:
    logs = [math.log10(v) for v in values]
    low, high = math.floor(min(logs)), math.ceil(max(logs))
    return (low, high + 1) if low == high else (low, high)


def log_profile(
    points: Sequence[Point],
    *,
    title: str,
    x_title: str,
    y_title: str,
    thresholds: Sequence[Threshold] = (),
    by_index: bool = False,
    css_class: str = "profile",
) -> str:
    """One marker per point on a log10 y axis, joined where consecutive values are > 0.
    Exact zeros (underflow) sit on the bottom edge as ▽, non-finite values on the top as ×,
    unmeasured ones as a hollow ring on the bottom edge."""
    frame = _Frame(max(len(points), 1), _bottom(points, by_index))
    positive = [
        p.value for p in points if p.value is not None and math.isfinite(p.value) and p.value > 0
    ]
    shown = [t for t in thresholds if t.value > 0 and math.isfinite(t.value)]
    low, high = _decades(positive + [t.value for t in shown] or [1.0])

    def y(value: float) -> float:
        return TOP + (high - math.log10(value)) / (high - low) * frame.plot_h

    parts = _open(title, frame, css_class)
    step = max(1, math.ceil((high - low) / MAX_DECADE_TICKS))
    for exponent in range(low, high + 1, step):
        gy = y(10.0**exponent)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{gy:.1f}" y2="{gy:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{LEFT - 8}" y="{gy + 4:.1f}" text-anchor="end">'
            f"10{str(exponent).translate(SUPERSCRIPT)}</text>"
        )
    for line in shown:
        parts += _threshold_line(y(line.value), line)
    parts.append(_path(points, frame, y))
    for i, point in enumerate(points):
        parts.append(_marker(i, point, frame, y))
    parts += _x_axis(points, frame, x_title, by_index)
    parts.append(_y_title(y_title, frame))
    parts.append("</svg>")
    return "\n".join(parts)


def _plottable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _path(points: Sequence[Point], frame: _Frame, y: Callable[[float], float]) -> str:
    segments: list[str] = []
    pen_down = False
    for i, point in enumerate(points):
        if point.value is not None and _plottable(point.value):
            command = "L" if pen_down else "M"
            segments.append(f"{command}{frame.x(i):.1f},{y(point.value):.1f}")
            pen_down = True
        else:
            pen_down = False
    return f'<path class="series" d="{" ".join(segments)}"/>' if segments else ""


def _marker(i: int, point: Point, frame: _Frame, y: Callable[[float], float]) -> str:
    x = frame.x(i)
    hot = " hot" if point.highlight else ""
    tip = f"<title>{esc(point.label)}: {esc(num(point.value))}</title>"
    label = esc(point.label)
    value = point.value
    if value is not None and _plottable(value):
        return (
            f'<g class="pt{hot}" data-label="{label}"><circle cx="{x:.1f}" '
            f'cy="{y(value):.1f}" r="{frame.radius}"/>{tip}</g>'
        )
    if value is None:
        return (
            f'<g class="pt missing" data-label="{label}"><circle cx="{x:.1f}" '
            f'cy="{frame.base_y:.1f}" r="{frame.radius}"/><title>{label}: not measured</title></g>'
        )
    if value == 0 or value < 0:
        b = frame.base_y
        return (
            f'<g class="pt zero{hot}" data-label="{label}"><path d="M{x - 5:.1f},{b - 9:.1f} '
            f'L{x + 5:.1f},{b - 9:.1f} L{x:.1f},{b - 1:.1f} Z"/>'
            f"<title>{label}: exactly 0 (underflowed)</title></g>"
        )
    return (
        f'<g class="pt nonfinite" data-label="{label}"><path d="M{x - 5:.1f},{TOP + 3:.1f} '
        f'L{x + 5:.1f},{TOP + 13:.1f} M{x + 5:.1f},{TOP + 3:.1f} L{x - 5:.1f},{TOP + 13:.1f}"/>'
        f"{tip}</g>"
    )


def fraction_bars(
    points: Sequence[Point],
    *,
    title: str,
    x_title: str,
    y_title: str,
    thresholds: Sequence[Threshold] = (),
    css_class: str = "fractions",
) -> str:
    """One bar per point on a 0–1 axis, coloured by the highest threshold it reaches."""
    frame = _Frame(max(len(points), 1), _bottom(points, False), BARS_PLOT_HEIGHT)

    def y(value: float) -> float:
        return TOP + (1 - min(max(value, 0.0), 1.0)) * frame.plot_h

    parts = _open(title, frame, css_class)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        gy = y(tick)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{gy:.1f}" y2="{gy:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{LEFT - 8}" y="{gy + 4:.1f}" text-anchor="end">'
            f"{tick:.0%}</text>"
        )
    bar_w = max(2.0, min(36.0, frame.plot_w / frame.n * 0.7))
    ranked = sorted(thresholds, key=lambda t: t.value)
    for i, point in enumerate(points):
        value = point.value if point.value is not None and math.isfinite(point.value) else 0.0
        level = "ok"
        for line in ranked:
            if value >= line.value:
                level = line.level
        top = y(value)
        height = max(frame.base_y - top, 1.0)  # a 0 still shows as a hairline
        parts.append(
            f'<g class="pt bar {level}" data-label="{esc(point.label)}">'
            f'<rect x="{frame.x(i) - bar_w / 2:.1f}" y="{frame.base_y - height:.1f}" '
            f'width="{bar_w:.1f}" height="{height:.1f}"/>'
            f"<title>{esc(point.label)}: {value:.1%}</title></g>"
        )
    for line in thresholds:
        parts += _threshold_line(y(line.value), line)
    parts += _x_axis(points, frame, x_title, by_index=False)
    parts.append(_y_title(y_title, frame))
    parts.append("</svg>")
    return "\n".join(parts)
