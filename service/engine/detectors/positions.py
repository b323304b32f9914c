"""A change of tensor size is no change of gradient: the depth profile seen per position.

‖∂L/∂a‖ is the norm over the whole output of a layer, and that norm changes with the output's
size even where the gradient that reaches the layer's weights does not. A mean over P positions
(a global average pooling, a mean over the time steps of an audio clip) hands each position 1/P
of the gradient of the mean: its backward broadcasts one gradient, divided by P, so the norm
of the tensor before it is 1/√P of the norm after it, however healthy the gradient. A
1D CNN over audio then read as vanishing in proportion to the clip's length (a mean over
640 000 steps: a 1/800 "drop" below the head), and ResNet's 7×7 average pooling as a 7×
drop. Upsampling does the opposite: its backward sums the gradients of the copies of each
entry, so the norm grows towards the input by up to √(copies).

What learning depends on is the weight gradient, and for weights shared over P positions
(a convolution's kernel, a Linear applied to every token) it is Σ_p ∂L/∂a_p · x_pᵀ: between
‖∂L/∂a‖ (the positions' gradients unrelated, adding in quadrature) and √P · ‖∂L/∂a‖ (the same
gradient at every position, as a mean's backward gives: they add up). A mean over P positions
leaves √P · ‖∂L/∂a‖ unchanged, which is why a depth rule is judged in both views and holds only
where both agree (`size_adjusted_profile`): a drop that only the raw view shows comes from the
tensor's size, not from the gradient.

The √P view is bounded step by step: a step of the profile from a layer with P positions to
one with P' is moved towards 1 by at most √(P/P'), the most an averaging (or copying) over
that many positions explains, and never past 1. A strided convolution with He's init keeps the
norm (its backward spreads each gradient over s positions that are s times as many), so it
gets no credit and a max pooling (which routes each gradient to one entry) neither; a
genuinely vanishing stack keeps the part of each step's drop the size change cannot explain.
Where the layers' sizes are equal (an MLP, a CNN at one resolution, a transformer with a head
per token) both views are the same profile and nothing changes.

Positions of a layer: entries of its output per example (`Measurements.layer_output_sizes`)
over the entries one application of its weights produces (a conv's output channels, a
Linear's output features, an embedding's width, a normalisation's channels). A recurrent
layer, or one whose count does not divide, has none and is left out of the √P view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from service.engine.detectors.optypes import canonical_op, is_embedding, is_recurrent
from service.engine.detectors.profile import backward_factor, usable
from service.engine.measurements import Measurements
from service.engine.report import LayerReport


def _units(layer: LayerReport, shapes: dict[str, list[int]]) -> int | None:
    """Entries one application of the layer's weights produces, or None when not known."""
    if is_recurrent(layer.op) or not layer.params:
        return None
    weights = [shapes[n] for n in layer.params if shapes.get(n)]
    if not weights:
        return None
    shape = max(weights, key=len)  # the weight matrix or kernel before a bias or a gain
    if len(shape) >= 3:  # a convolution's [out, in/groups, *kernel] (ONNX's W alike)
        return shape[0]
    if len(shape) == 2:
        if is_embedding(layer.op) or canonical_op(layer.op) == "gather":
            return shape[-1]
        # fan_out knows the orientation (an ONNX MatMul's initializer is [in, out])
        return layer.fan_out or shape[0]
    return shape[0]  # a normalisation's per-channel gain


def weight_positions(m: Measurements) -> dict[str, int]:
    """Layer name → positions per example that share its weights (module docstring)."""
    shapes = {p.name: list(p.shape) for p in m.parameters}
    positions: dict[str, int] = {}
    for layer in m.layers:
        size = m.layer_output_sizes.get(layer.name)
        units = _units(layer, shapes)
        if size and units and size % units == 0:
            positions[layer.name] = size // units
    return positions


@dataclass
class SizeAdjusted:
    """The depth profile in the √positions view, where the layers' sizes differ."""

    norms: list[float | None]
    ratio: float | None  # the input end's adjusted norm / the last layer's
    factor: float | None  # backward per-layer fit of the adjusted profile
    positions: dict[str, int] = field(default_factory=dict)  # the input end's and the last's

    def agrees_vanishing(self, threshold: float) -> bool:
        return self.ratio is None or self.ratio < threshold

    def agrees_exploding(self, threshold: float, layer_factor: float) -> bool:
        if self.ratio is None:
            return True
        return self.ratio > threshold and self.factor is not None and self.factor > layer_factor


def size_adjusted_profile(
    m: Measurements, names: list[str], norms: list[float | None], start: str | None
) -> SizeAdjusted | None:
    """The profile `names`/`norms` (input → output) with each step's tensor-size change
    credited as the module docstring says; None when the layers' positions are not known or
    all equal (nothing to adjust). `start` is the profile's input end (`depth_ratio_from`)."""
    positions = weight_positions(m)
    pairs = enumerate(zip(names, norms, strict=True))
    known = [i for i, (n, v) in pairs if n in positions and usable(v)]
    if len(known) < 2 or len({positions[names[i]] for i in known}) < 2:
        return None
    credit = [1.0] * len(names)
    running, later = 1.0, None
    known_set = set(known)
    for i in reversed(range(len(names))):
        if i in known_set:
            if later is not None:
                step = norms[i] / norms[later]  # type: ignore[operator]
                reduced = positions[names[i]] / positions[names[later]]
                low, high = sorted((step, 1.0))
                credited = min(max(step * math.sqrt(reduced), low), high)
                running *= credited / step
            later = i
        credit[i] = running
    adjusted = [v * c if v is not None else None for v, c in zip(norms, credit, strict=True)]
    ratio = None
    last = adjusted[-1]
    if start in names and usable(last) and usable(norms[-1]):
        first = adjusted[names.index(start)]
        if first is not None and math.isfinite(first):
            ratio = first / last  # type: ignore[operator]
    return SizeAdjusted(
        norms=adjusted,
        ratio=ratio,
        factor=backward_factor(adjusted),
        positions={n: positions[n] for n in (start, names[-1]) if n in positions},
    )


def vanishing_in_both(ratio: float | None, sized: SizeAdjusted | None, cut: float) -> bool:
    """The depth ratio is below `cut`, and so is the size-adjusted one where there is one."""
    return ratio is not None and ratio < cut and (sized is None or sized.agrees_vanishing(cut))


def exploding_in_both(
    ratio: float | None,
    compounding: bool,
    sized: SizeAdjusted | None,
    cut: float,
    layer_factor: float,
) -> bool:
    """The depth ratio is above `cut` with compounding growth, and so is the size-adjusted
    profile where there is one."""
    if ratio is None or ratio <= cut or not compounding:
        return False
    return sized is None or sized.agrees_exploding(cut, layer_factor)
