"""Detectors: turn one pass's `Measurements` into findings (CONTRACT.md §3 `findings`).

    detect(m, thresholds=None) -> list[Finding]

Pure functions of the measurements; every number they compare against is a named threshold
documented in `service.engine.detectors.thresholds` (the reference for what is unhealthy).
Findings come ordered by severity (errors first), then in a fixed kind order, so that their
indexes (which recommendations point at) are stable.
"""

from __future__ import annotations

from typing import Any

from service.engine.detectors.gradients import depth_findings, time_findings
from service.engine.detectors.numerics import (
    fp16_findings,
    no_parameter_findings,
    non_finite_findings,
)
from service.engine.detectors.quantizers import quantizer_findings
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


def detect(m: Measurements, thresholds: dict[str, Any] | None = None) -> list[Finding]:
    """All findings of one pass, worst first. `thresholds` overrides named defaults."""
    t = resolve_thresholds(thresholds)
    precision = m.precision
    findings: list[Finding] = []
    findings += no_parameter_findings(m)
    findings += non_finite_findings(m)
    if m.parameters:
        findings += depth_findings(m, t)
        findings += time_findings(m, t)
        findings += saturation_findings(m, t)
        findings += dead_unit_findings(m, t)
        findings += quantizer_findings(m, t)
        findings += init_scale_findings(m, t)
        findings += fp16_findings(m, t, precision)
    findings.sort(key=lambda f: (-SEVERITY_RANK[f.severity], _KIND_ORDER.index(f.kind)))
    return findings
