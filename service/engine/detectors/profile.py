"""Small numeric helpers shared by the detectors: ratios and log-linear fits of norm profiles."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

_MAX_PAIRWISE = 200  # points kept for the pairwise fit (~20k slopes)


def usable(value: float | None) -> bool:
    """A norm that a ratio or a log can be taken of."""
    return value is not None and math.isfinite(value) and value > 0.0


def growth_factor(norms: Sequence[float | None]) -> float | None:
    """Per-step factor of the norms read from the first entry to the last: THE fit of a norm
    profile (the report's `profiles.depth.growth_factor` / `profiles.time[].growth_factor` and
    the detectors' per-layer factor both come from it).

    Theil–Sen slope (median of pairwise slopes) of log(norm) against the index, so that one jump
    (a normalisation layer dividing by a small std, a loss-side layer) does not pass for growth
    that compounds. Entries that are None, 0 or not finite are left out (their index stays, so
    the slope is still per step). None when fewer than 3 usable points.
    """
    points = [(i, math.log(v)) for i, v in enumerate(norms) if usable(v)]  # type: ignore[arg-type]
    if len(points) < 3:
        return None
    if len(points) > _MAX_PAIRWISE:  # long time profiles: evenly thinned, same median slope
        step = len(points) / _MAX_PAIRWISE
        points = [points[int(k * step)] for k in range(_MAX_PAIRWISE)]
    slopes = _pairwise_slopes(points)
    mid = len(slopes) // 2
    # the middle one or two of the sorted slopes (a partial sort, as numpy floats → Python)
    middle = np.partition(slopes, [mid - 1, mid] if len(slopes) % 2 == 0 else [mid])
    slope = (
        float(middle[mid]) if len(slopes) % 2 else (float(middle[mid - 1]) + float(middle[mid])) / 2
    )
    return math.exp(slope) if slope < 700 else math.inf


@functools.lru_cache(maxsize=64)
def _pairs(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs i < j of `count` points (read-only; the same few counts recur)."""
    first, second = np.triu_indices(count, k=1)
    first.flags.writeable = second.flags.writeable = False
    return first, second


def _pairwise_slopes(points: list[tuple[int, float]]) -> np.ndarray:
    """(y_j − y_i)/(x_j − x_i) for every pair i < j, as one float64 array: the same IEEE
    operations as the Python expression per pair (the indices are small integers, exact as
    floats), without ~n²/2 Python steps: a 107-layer ResNet-50 profile's 5.7k slopes took
    ~1.5 ms of host time per diagnosis that way, after the device had finished."""
    xs = np.fromiter((x for x, _ in points), dtype=np.float64, count=len(points))
    ys = np.fromiter((y for _, y in points), dtype=np.float64, count=len(points))
    first, second = _pairs(len(points))
    return (ys[second] - ys[first]) / (xs[second] - xs[first])


def backward_factor(norms: Sequence[float | None]) -> float | None:
    """`growth_factor` read from the last entry back to the first (its reciprocal): 2.0 =
    doubles at every step towards the input (or towards the first time step)."""
    forward = growth_factor(norms)
    if forward is None:
        return None
    return 1.0 / forward if forward > 0 else math.inf


def depth_fit_phrase(forward: float | None) -> str:
    """How messages quote the depth fit: in the profile's own direction (input → output), as
    the report's `profiles.depth.growth_factor` and the CLI's profile line do."""
    if forward is None:
        return "no per-layer fit (fewer than 3 measured layers)"
    return f"the depth profile grows ×{sig(forward)} per layer towards the output"


def decay_phrase(evidence: dict[str, Any]) -> str:
    """How a vanishing finding's gradient shrinks towards the input: in one step, or the fit."""
    drop = evidence.get("one_step_drop")
    if not drop:
        return depth_fit_phrase(evidence.get("growth_factor"))
    return (
        f"most of it in one step below {drop['below']}: no layer under it gets more than "
        f"{sig(drop['factor'])} of the gradient of any layer from it up"
    )


def reached_steps(norms: Sequence[float | None]) -> tuple[list[float | None], int]:
    """The time steps up to the last one the loss reaches, and how many after it it does not:
    trailing steps whose gradient is exactly zero (a next-token loss leaves the last position's
    prediction out, with -100 labels or a shift inside the model) are no decay, and the
    first/last ratio against an exact zero was infinite, so a shifted LSTM language model was
    not judged over time at all."""
    end = len(norms)
    while end > 1 and norms[end - 1] == 0.0:
        end -= 1
    return list(norms[:end]), len(norms) - end


def first_last_ratio(norms: Sequence[float | None]) -> float | None:
    """norm of the first usable entry / norm of the last; 0 when the first is exactly zero."""
    values = [v for v in norms if v is not None and math.isfinite(v)]
    if len(values) < 2 or not usable(values[-1]):
        return None
    return values[0] / values[-1]


def ratio_phrase(ratio: float) -> str:
    """A gradient ratio for a message; a norm of 0 is one float32 could not hold: nothing
    reaches the layer, fp16 flushed it, or every entry's square is below float32's range
    (a 30-layer sigmoid stack's first layer, ~1e-26: no step would move its weights)."""
    return "0 in float32" if ratio == 0 else sig(ratio)


def sig(value: float | None, digits: int = 3) -> str:
    """A number for a message: 3 significant digits, scientific when very small or large."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"
