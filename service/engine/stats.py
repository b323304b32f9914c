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

from collections.abc import Sequence

import torch

SATURATION_DERIVATIVE = 0.01
FP16_TINY = 2.0**-24
FP16_MAX = 65504.0


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
    """Per-parameter vectors (one entry per tensor), computed with a fixed number of kernels
    whatever the number of parameters: the tensors are concatenated once and reduced per
    segment. A missing gradient counts as zeros."""
    if not weights:
        empty = torch.zeros(0)
        return {k: empty for k in ("grad_norm", "weight_norm", "weight_std")} | {
            k: empty for k in ("non_finite", "underflow", "overflow", "numel")
        }
    device = weights[0].device
    lengths = torch.tensor([w.numel() for w in weights], device=device)
    flat_w = torch.cat([w.detach().reshape(-1).float() for w in weights])
    flat_g = torch.cat(
        [
            (g.detach().reshape(-1).float() if g is not None else torch.zeros_like(w.reshape(-1)))
            for w, g in zip(weights, grads, strict=True)
        ]
    )
    abs_g = flat_g.abs()
    finite = torch.isfinite(flat_g)
    flags = torch.stack(
        [
            (~finite).float(),
            ((abs_g < FP16_TINY) & (flat_g != 0)).float(),
            ((abs_g > FP16_MAX) & finite).float(),
            flat_w,
            flat_w.square(),
        ],
        dim=1,
    )
    sums = torch.segment_reduce(flags, "sum", lengths=lengths, axis=0).T  # [5, n_params]
    grads_present = [g.detach() if g is not None else torch.zeros((), device=device) for g in grads]
    grad_norms = torch.stack(
        [n.float() for n in torch._foreach_norm([g.float() for g in grads_present])]
    )
    numel = lengths.float()
    mean_w = sums[3] / numel
    var_w = (sums[4] / numel - mean_w.square()).clamp_min(0.0)
    return {
        "grad_norm": grad_norms,
        "weight_norm": sums[4].sqrt(),
        "weight_std": var_w.sqrt(),
        "non_finite": sums[0],
        "underflow": sums[1],
        "overflow": sums[2],
        "numel": numel,
    }
