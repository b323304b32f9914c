"""The before/after numbers a verification reports: for each finding kind, the figures that
show whether a fix worked, read from one pass's Measurements."""

from __future__ import annotations

import math
from typing import Any

from service.engine.detectors.gradients import depth_profile
from service.engine.detectors.profile import backward_factor, first_last_ratio
from service.engine.measurements import Measurements
from service.engine.report import SEVERITY_RANK, Finding


def _max(values: list[float | None]) -> float | None:
    usable = [v for v in values if v is not None and math.isfinite(v)]
    return max(usable) if usable else None


def figures(m: Measurements, kinds: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if kinds & {"vanishing_gradients", "exploding_gradients"}:
        _, norms = depth_profile(m)
        out["depth_ratio"] = first_last_ratio(norms)
        out["per_layer_factor"] = backward_factor(norms)
        out["max_grad_to_weight"] = _max([x.grad_to_weight for x in m.layers])
        out["min_grad_to_weight"] = min(
            (x.grad_to_weight for x in m.layers if x.grad_to_weight is not None), default=None
        )
        if m.profiles.time:
            out["time_ratio"] = first_last_ratio(list(m.profiles.time[0].grad_norms))
        out["total_grad_norm"] = math.sqrt(
            sum(p.grad_norm**2 for p in m.parameters if p.grad_norm and math.isfinite(p.grad_norm))
        )
    if "saturation" in kinds:
        out["max_saturated_fraction"] = _max(
            [x.activation_stats.saturated_fraction for x in m.layers]
        )
    if "dead_units" in kinds:
        out["max_dead_fraction"] = _max([x.activation_stats.dead_fraction for x in m.layers])
    if "quantizer_clipping" in kinds:
        out["max_clipped_fraction"] = _max([q.clipped_fraction for q in m.quantizers])
        out["total_grad_norm"] = math.sqrt(
            sum(p.grad_norm**2 for p in m.parameters if p.grad_norm and math.isfinite(p.grad_norm))
        )
    if "init_scale" in kinds:
        ratios = [x.init_std_ratio for x in m.layers if x.init_std_ratio is not None]
        out["init_std_ratio_range"] = [min(ratios), max(ratios)] if ratios else None
    if "non_finite" in kinds:
        out["loss"] = m.loss.value
        out["non_finite_parameters"] = sum(1 for p in m.parameters if p.non_finite)
        out["origin"] = m.non_finite_origin.node if m.non_finite_origin else None
        # whether the gradient still flows once the values are finite (a clamp zeroes the
        # gradient of every clamped entry): the finite gradients' size
        out["max_grad_to_weight"] = _max([x.grad_to_weight for x in m.layers])
    if "fp16_underflow" in kinds:
        total = sum(math.prod(p.shape) if p.shape else 1 for p in m.parameters) or 1
        out["fp16_underflow_fraction"] = (
            sum(
                p.fp16_underflow_fraction * (math.prod(p.shape) if p.shape else 1)
                for p in m.parameters
            )
            / total
        )
        out["fp16_overflow_fraction"] = (
            sum(
                p.fp16_overflow_fraction * (math.prod(p.shape) if p.shape else 1)
                for p in m.parameters
            )
            / total
        )
    return out


def same_finding(before: Finding, candidates: list[Finding]) -> Finding | None:
    """The finding after the fix that is the same problem (same kind, same axis)."""
    axis = before.evidence.get("axis")
    for f in candidates:
        if f.kind == before.kind and f.evidence.get("axis") == axis:
            return f
    return None


def summary(f: Finding | None) -> dict[str, Any]:
    if f is None:
        return {"present": False}
    return {"present": True, "severity": f.severity, "layers": f.layers[:5]}


def key_of(f: Finding) -> str:
    """'vanishing_gradients[time]': the kind, and the axis where it has one."""
    return f"{f.kind}" + (f"[{f.evidence['axis']}]" if "axis" in f.evidence else "")


def new_findings(
    after: list[Finding], before: list[Finding], addressed: list[Finding]
) -> list[Finding]:
    """The findings at warning or error after a fix that were not there before: no finding of
    the same kind and axis before, or only a milder one (a warning that became an error is a new
    error). The addressed findings are reported under their own key, so they are left out."""
    out = []
    for f in after:
        if f.severity not in ("warning", "error") or same_finding(f, addressed) is not None:
            continue
        axis = f.evidence.get("axis")
        was = [
            SEVERITY_RANK[b.severity]
            for b in before
            if b.kind == f.kind and b.evidence.get("axis") == axis
        ]
        if max(was, default=-1) < SEVERITY_RANK[f.severity]:
            out.append(f)
    return out


def described(f: Finding) -> dict[str, Any]:
    """A new finding as `after.new_findings` lists it."""
    out: dict[str, Any] = {"kind": f.kind, "severity": f.severity}
    if "axis" in f.evidence:
        out["axis"] = f.evidence["axis"]
    out["layers"] = f.layers[:5]
    out["message"] = f.message
    return out
