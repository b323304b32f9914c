"""On-device statistics of activations and parameters, float32 whatever the model's dtype.

Nothing here moves data to the host: each function returns 0-dim (or small) tensors on the
tensor's device; measure.py transfers everything once at the end of the pass.

Definitions (also in the report's docs):
- saturated_fraction: fraction of activation entries (all samples × units) whose local
  derivative is below `SATURATION_DERIVATIVE` (0.01). sigmoid: σ(1−σ); tanh: 1−t²;
  softsign: (1−|y|)²; hardsigmoid/hardtanh: 0 at their bounds (y ≤ 0 or y ≥ 1 / |y| ≥ 1).
- dead_fraction: fraction of units (every position of the output except the batch axis 0)
  that are exactly zero for every sample of the batch (ReLU-like activations only).
- fp16 underflow fraction: entries g with g ≠ 0 and |g| < 2⁻²⁴ (the smallest fp16 subnormal),
  i.e. non-zero gradients that fp16 would round to zero or to its coarsest subnormal, divided by
  all entries. Overflow fraction: entries with |g| > 65504 (fp16 max), non-finite excluded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SATURATION_DERIVATIVE = 0.01
FP16_TINY = 2.0**-24
FP16_MAX = 65504.0
_FLOAT32_MAX = torch.finfo(torch.float32).max


def saturated_count(y: torch.Tensor, activation: str) -> torch.Tensor:
    """Entries of activation output `y` whose local derivative < SATURATION_DERIVATIVE."""
    y = y.float()
    if activation == "sigmoid":
        derivative = y * (1.0 - y)
    elif activation == "tanh":
        derivative = 1.0 - y * y
    elif activation == "softsign":
        derivative = (1.0 - y.abs()).square()
    elif activation == "hardsigmoid":
        return ((y <= 0.0) | (y >= 1.0)).sum()
    elif activation == "hardtanh":
        return (y.abs() >= 1.0).sum()
    else:
        return torch.zeros((), device=y.device, dtype=torch.int64)
    return (derivative < SATURATION_DERIVATIVE).sum()


def alive_units(y: torch.Tensor) -> torch.Tensor:
    """Bool mask over the units (all axes but the batch axis 0): non-zero for some sample."""
    if y.dim() == 0:
        return (y != 0).reshape(1)
    return (y != 0).any(dim=0)


def moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) in float32."""
    var, mean = torch.var_mean(y.float() if y.dtype != torch.float32 else y, correction=0)
    return mean, var


def parameter_statistics(
    weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """Per-parameter vectors (one entry per tensor) with a fixed number of kernels whatever the
    number of parameters: norms by `_foreach_norm`, counts by concatenating the gradients once
    and reducing 0/1 indicator rows per segment.

    The indicators come from `heaviside` on shifted |g| because it writes float32 directly:
    comparisons give bool tensors, and bool→float conversion and `isfinite` are unvectorised
    on CPU (10-20× slower than the arithmetic here). NaN is mapped to inf first so that every
    indicator stays 0/1. A missing gradient counts as zeros.
    `weight_rms` = ‖W‖/√n, the weight scale compared with He/Xavier (equal to the std for the
    zero-mean initialisations those schemes prescribe).
    """
    keys = ("grad_norm", "weight_norm", "weight_rms", "non_finite", "underflow", "overflow")
    if not weights:
        return {k: torch.zeros(0) for k in (*keys, "numel")}
    device = weights[0].device
    sizes = [w.numel() for w in weights]
    grads_or_zero = [
        g.detach() if g is not None else torch.zeros_like(w)
        for w, g in zip(weights, grads, strict=True)
    ]
    flat = torch.cat([g.reshape(-1).float() for g in grads_or_zero])
    magnitude = torch.nan_to_num(flat.abs(), nan=math.inf, posinf=math.inf)
    zero, one = torch.zeros((), device=device), torch.ones((), device=device)
    rows = torch.empty((4, flat.numel()), device=device)
    torch.heaviside(magnitude - _FLOAT32_MAX, zero, out=rows[0])  # non-finite
    torch.heaviside(FP16_TINY - magnitude, zero, out=rows[1])  # |g| < 2^-24, zeros included
    torch.heaviside(-magnitude, one, out=rows[2])  # g == 0
    torch.heaviside(magnitude - FP16_MAX, zero, out=rows[3])  # |g| > 65504, inf included
    lengths = torch.tensor(sizes, device=device).expand(4, -1).contiguous()
    counts = torch.segment_reduce(rows, "sum", lengths=lengths, axis=1)
    grad_norms = torch.stack(
        [n.float() for n in torch._foreach_norm([g.float() for g in grads_or_zero])]
    )
    weight_norms = torch.stack(
        [n.float() for n in torch._foreach_norm([w.detach().float() for w in weights])]
    )
    numel = torch.tensor(sizes, device=device, dtype=torch.float32)
    return {
        "grad_norm": grad_norms,
        "weight_norm": weight_norms,
        "weight_rms": weight_norms / numel.sqrt(),
        "non_finite": counts[0],
        "underflow": counts[1] - counts[2],
        "overflow": counts[3] - counts[0],
        "numel": numel,
    }
