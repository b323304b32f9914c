"""Fake quantisers that clip: what a quantisation-aware-training model's straight-through
estimator cannot pass (thresholds.py, `quantizer_clipping`)."""

from __future__ import annotations

from service.engine.detectors.profile import sig
from service.engine.measurements import Measurements
from service.engine.report import Finding, QuantizerReport


def quantized_what(q: QuantizerReport) -> str:
    """What the quantiser quantises, for a sentence: 'the output of layers.0'."""
    if q.quantizes == "weight":
        shown = ", ".join(q.parameters[:2]) + (", ..." if len(q.parameters) > 2 else "")
        return f"the weight {shown}" if shown else "a weight"
    if q.layer is not None:
        return f"the output of {q.layer}"
    return f"the value {q.input}"


def range_text(q: QuantizerReport) -> str:
    """'[0, 0.128]' (a per-channel quantiser: its widest channel's ends)."""
    if q.range_min is None or q.range_max is None:
        return "(unknown)"
    widest = " (widest channel)" if q.per_channel else ""
    return f"[{sig(q.range_min)}, {sig(q.range_max)}]{widest}"


def quantizer_findings(m: Measurements, t: dict[str, float]) -> list[Finding]:
    hits = [q for q in m.quantizers if q.clipped_fraction >= t["quantizer_clipping_warning"]]
    if not hits:
        return []
    hits.sort(key=lambda q: -q.clipped_fraction)
    worst = hits[0]
    severity = "error" if worst.clipped_fraction >= t["quantizer_clipping_error"] else "warning"
    observed = f"[{sig(worst.input_min)}, {sig(worst.input_max)}]"
    return [
        Finding(
            kind="quantizer_clipping",
            severity=severity,
            message=(
                f"{len(hits)} fake quantiser(s) clip what they quantise: "
                f"{sig(worst.clipped_fraction)} of {quantized_what(worst)} falls outside "
                f"its range {range_text(worst)} (the batch spans {observed}) and is clamped, and a "
                "clamped value gets no gradient through the straight-through estimator."
            ),
            layers=list(dict.fromkeys(q.layer or q.input for q in hits)),
            evidence={
                "clipped_fraction": {q.name: q.clipped_fraction for q in hits},
                "quantizes": {q.name: q.quantizes for q in hits},
                "covering_scale_factor": {q.name: q.covering_scale_factor for q in hits},
                "worst_quantizer": worst.name,
                "worst_fraction": worst.clipped_fraction,
            },
        )
    ]
