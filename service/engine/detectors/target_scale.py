"""A regression target far off the output's scale: the cause of large gradients, named.

The gradient a regression loss hands the model is in the target's units: ∂L/∂y = 2(y − t)/n
for mse, sign(y − t)/n for l1. A model at initialisation outputs values of order 1, so a target
of order 1e4 (prices, counts, raw sensor readings) makes ∂L/∂y, and through it every weight
gradient, of order 1e4: grad/weight far above 1, an exploding_gradients error whose cause is
neither the depth nor the initialisation. Clipping or a lower learning rate only hide it (and
slow the layers that are fine); standardising the target, (t − mean) / std, and undoing it on
the predictions, removes it. The ratios (depth, weight) are blind to it: they are
scale-invariant; only the absolute-scale rule (grad/weight) sees it, so that is the finding
this explains.

Judged on Measurements.target_scale (the first batch's target and output, losses.py
`regression_scale`): the target's RMS, √(mean² + std²), over the output's RMS, the latter at
least 1 (a standardised target, RMS ~1, is never off, however small the outputs of a fresh
model are), at or above `target_scale_ratio`.
"""

from __future__ import annotations

import math
from typing import Any

from service.engine.detectors.profile import sig
from service.engine.losses import REGRESSION_LOSSES
from service.engine.measurements import Measurements
from service.engine.report import Finding


def target_scale_evidence(m: Measurements, t: dict[str, float]) -> dict[str, Any] | None:
    """The evidence of a target off the output's scale, or None when there is none."""
    scale = m.target_scale
    if scale is None or m.loss.kind not in REGRESSION_LOSSES:
        return None
    keys = ("target_mean", "target_std", "output_mean", "output_std")
    values = [scale.get(k) for k in keys]
    if not all(v is not None and math.isfinite(v) for v in values):
        return None
    target_mean, target_std, output_mean, output_std = (float(v or 0.0) for v in values)
    target_rms = math.hypot(target_mean, target_std)
    output_rms = math.hypot(output_mean, output_std)
    ratio = target_rms / max(output_rms, 1.0)
    if ratio < t["target_scale_ratio"]:
        return None
    return {
        "loss_kind": m.loss.kind,
        "loss": m.loss.value,
        "target_mean": target_mean,
        "target_std": target_std,
        "output_mean": output_mean,
        "output_std": output_std,
        "ratio": ratio,  # target RMS / max(output RMS, 1)
    }


def explain_target_scale(
    m: Measurements, findings: list[Finding], t: dict[str, float]
) -> list[Finding]:
    """The depth exploding finding that grad/weight raised, told its cause when the target is
    off the output's scale (evidence `target_scale`); the findings otherwise unchanged."""
    evidence = target_scale_evidence(m, t)
    if evidence is None:
        return findings
    for f in findings:
        rules = f.evidence.get("rules") or []
        if f.kind != "exploding_gradients" or f.evidence.get("axis") != "depth":
            continue
        if "absolute_scale" not in rules:
            continue
        f.evidence["target_scale"] = evidence
        f.message += " " + target_scale_text(evidence)
    return findings


def target_scale_text(e: dict[str, Any]) -> str:
    """One sentence on the target's scale and what it does to the gradients."""
    spread = f"{sig(e['target_mean'])} ± {sig(e['target_std'])}"
    return (
        f"The cause is the regression target's scale: the {e['loss_kind']} loss (value "
        f"{sig(e['loss'])}) compares the output, of std {sig(e['output_std'])}, with targets "
        f"of {spread}, {sig(e['ratio'])}× its scale, and ∂L/∂y is in the target's units; "
        "standardise the target ((t − mean) / std) rather than clip the gradients."
    )
