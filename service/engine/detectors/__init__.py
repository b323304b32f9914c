"""Detectors: turn one pass's `Measurements` into findings (CONTRACT.md §3 `findings`).

    detect(m, thresholds=None) -> list[Finding]

Pure functions of the measurements; every number they compare against is a named threshold
documented in `service.engine.detectors.thresholds` (the reference for what is unhealthy).
Findings come ordered by severity (errors first), then in a fixed kind order, so that their
indexes (which recommendations point at) are stable.
"""

from __future__ import annotations

from typing import Any

from service.engine.detectors.frozen import trained_part, with_trainable_weights
from service.engine.detectors.gradients import (
    depth_findings,
    depth_profile,
    fp32_weight_ratio,
    time_findings,
    zero_init_blocked,
)
from service.engine.detectors.numerics import (
    fp16_findings,
    no_parameter_findings,
    non_finite_findings,
)
from service.engine.detectors.profile import sig
from service.engine.detectors.quantizers import quantizer_findings
from service.engine.detectors.target_scale import explain_target_scale
from service.engine.detectors.thresholds import DEFAULTS, THRESHOLDS, resolve_thresholds
from service.engine.detectors.units import (
    dead_unit_findings,
    init_scale_findings,
    saturation_findings,
)
from service.engine.measurements import Measurements
from service.engine.report import SEVERITY_RANK, Finding

__all__ = ["DEFAULTS", "THRESHOLDS", "detect", "resolve_thresholds"]

_KIND_ORDER = [
    "no_trainable_parameters",
    "non_finite",
    "exploding_gradients",
    "vanishing_gradients",
    "saturation",
    "dead_units",
    "quantizer_clipping",
    "init_scale",
    "fp16_underflow",
]


def _fp16_only_vanishing(
    m: Measurements, findings: list[Finding], t: dict[str, Any]
) -> list[Finding]:
    """An fp16 run whose layers get no gradient because fp16 flushed it, while the fp32
    reference pass of the same batch shows no vanishing (first/last weight-gradient ratio
    at or above `vanishing_weight_ratio`): the cause is the underflow, which loss scaling
    fixes, not the depth. The vanishing finding is folded into the fp16_underflow one."""
    underflow = next((f for f in findings if f.kind == "fp16_underflow"), None)
    vanishing = next((f for f in findings if f.kind == "vanishing_gradients"), None)
    if underflow is None or vanishing is None or underflow.severity == "info":
        return findings
    zero = vanishing.evidence.get("zero_gradient_layers") or []
    ratio = fp32_weight_ratio(m)
    if not zero or ratio is None or ratio < t["vanishing_weight_ratio"]:
        return findings
    shown = ", ".join(zero[:3]) + (f" and {len(zero) - 3} more" if len(zero) > 3 else "")
    underflow.message += (
        f" It is why {shown} get no gradient in this pass: in the fp32 pass the first "
        f"layer's weight gradient is {sig(ratio)} of the last's, so the gradients do not "
        "vanish with depth; they fall below fp16's range."
    )
    underflow.layers = list(dict.fromkeys([*underflow.layers, *zero]))
    underflow.evidence["flushed_layers"] = zero
    underflow.evidence["fp32_weight_ratio"] = ratio
    return [f for f in findings if f is not vanishing]


def detect(m: Measurements, thresholds: dict[str, Any] | None = None) -> list[Finding]:
    """All findings of one pass, worst first. `thresholds` overrides named defaults."""
    t = resolve_thresholds(thresholds)
    precision = m.precision
    findings: list[Finding] = []
    findings += no_parameter_findings(m)
    findings += non_finite_findings(m)
    if m.parameters:
        # what training updates: frozen layers no trainable one is upstream of left out
        m = trained_part(m)
        findings += depth_findings(m, t)
        findings += time_findings(m, t)
        findings += saturation_findings(m, t)
        findings += dead_unit_findings(m, t)
        findings += quantizer_findings(m, t)
        blocked = zero_init_blocked(m, *depth_profile(m))
        zero_by_design = frozenset(p for params in blocked.values() for p in params)
        findings += init_scale_findings(with_trainable_weights(m), t, zero_by_design)
        findings += fp16_findings(m, t, precision)
        findings = _fp16_only_vanishing(m, findings, t)
        findings = explain_target_scale(m, findings, t)
    findings.sort(key=lambda f: (-SEVERITY_RANK[f.severity], _KIND_ORDER.index(f.kind)))
    return findings
