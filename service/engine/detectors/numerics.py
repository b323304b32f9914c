"""Numerical findings: NaN/Inf (with the op they were born in), fp16 underflow, no parameters."""

from __future__ import annotations

import math

from service.engine.detectors.origin_text import describe
from service.engine.detectors.profile import sig
from service.engine.layers import canonical
from service.engine.measurements import Measurements
from service.engine.report import Finding, Severity


def non_finite_findings(m: Measurements) -> list[Finding]:
    bad_params = [p for p in m.parameters if p.non_finite]
    loss_bad = m.loss.value is not None and not math.isfinite(m.loss.value)
    origin = m.non_finite_origin
    if origin is None and not bad_params and not loss_bad:
        return []
    layers: list[str] = []
    if origin is not None and origin.layer:
        layers.append(origin.layer)
    for p in bad_params:
        if p.layer and p.layer not in layers:
            layers.append(p.layer)
    evidence: dict[str, object] = {
        "loss": m.loss.value,
        "non_finite_parameters": {p.name: p.non_finite_count for p in bad_params},
    }
    # Absorbed before the loss and every parameter gradient: born in the forward pass (T5's
    # relative position buckets take log(0) = -inf, cast it to an integer and select it away)
    # or in the backward pass (sqrt of a ReLU's output: d sqrt = inf at its zeros, which the
    # ReLU's backward selects away). Nothing this batch trains on is touched: told, not judged.
    contained = origin is not None and not bad_params and not loss_bad
    if contained and origin is not None and _mask_sum(origin.op_type, origin.values):
        return []
    evidence["reaches_loss"] = not contained
    if origin is not None:
        evidence["origin"] = {
            "node": origin.node,
            "op_type": origin.op_type,
            "phase": origin.phase,
            "value": origin.value,
            "layer": origin.layer,
        }
        if origin.values:  # what the op's inputs and outputs held (origin.OriginRecorder)
            evidence["origin"]["values"] = origin.values  # type: ignore[index]
        what, guard = describe(evidence["origin"])  # type: ignore[arg-type]
        message = (
            f"NaN/Inf values appear: {what}; {guard}."
            if origin.values
            else f"NaN/Inf values appear, {what}; {guard}."
        )
        if contained and origin.phase == "backward":
            message = (
                f"NaN/Inf values appear in the backward pass but reach no parameter gradient: "
                f"{what}; the backward of an op before it absorbs them (a ReLU's or a where's "
                "at the entries it zeroes), so this batch trains normally; if a gradient could "
                f"carry them to a weight, {guard}."
            )
        elif contained:
            message = (
                f"NaN/Inf values appear but reach neither the loss nor any gradient: {what}; "
                "something downstream absorbs them (a where, a comparison, an integer cast, a "
                f"softmax), so this batch trains normally; if other data could carry them into "
                f"the loss, {guard}."
            )
    elif loss_bad:
        message = f"NaN/Inf values appear, the loss is {m.loss.value}; guard the op that feeds it."
    else:
        message = (
            f"NaN/Inf values appear in the gradients of {len(bad_params)} parameter(s); an op's "
            "backward divides by zero (sqrt/pow/norm at 0): guard it with an eps."
        )
    return [
        Finding(
            kind="non_finite",
            severity="info" if contained else "error",
            message=message,
            layers=layers,
            evidence=evidence,
        )
    ]


# Magnitude only an attention mask reaches: torch.finfo(float16).min is -65504, float32's
# -3.4e38; Hugging Face masks with the dtype's min rather than -inf
MASK_MAGNITUDE = 6.0e4


def _mask_sum(op_type: str, values: dict[str, object] | None) -> bool:
    """An add of two masks (a causal mask and a padding mask, each at the dtype's min) whose
    sum overflowed to -inf where both mask a position (GPT-Neo's local attention): -inf only,
    no NaN or +inf. A mask's intended value, absorbed by the softmax after it: no NaN/Inf
    origin, as a -inf mask is none."""
    if canonical(op_type) not in ("add", "sub") or not isinstance(values, dict):
        return False
    inputs, output = values.get("inputs"), values.get("output")
    if not isinstance(inputs, list) or len(inputs) != 2 or not isinstance(output, dict):
        return False
    if not all(isinstance(x, dict) for x in inputs):
        return False
    only_neginf = output.get("nan") == 0 and output.get("posinf") == 0
    # every input down at a mask's magnitude, and one of them an additive mask: zeros where
    # a position is attended, the dtype's min elsewhere, nothing above 0
    deep = all(x.get("min", 0.0) <= -MASK_MAGNITUDE for x in inputs)
    additive = any(x.get("zero", 0) > 0 and x.get("max", 1.0) <= 0.0 for x in inputs)
    return bool(only_neginf and deep and additive and output.get("neginf", 0) > 0)


def fp16_findings(m: Measurements, t: dict[str, float], precision: str) -> list[Finding]:
    """fp16 underflow. Only an fp16 run (`--precision fp16` or an fp16 model) loses these
    gradients now: warning, error past `fp16_underflow_fraction_error`. An fp32 run gets an
    `info` forecast ("if you train in fp16…"), which never turns the verdict; a bf16 run none
    (bf16 has fp32's exponent range)."""
    if precision == "bf16":
        return []
    sized = [(p, math.prod(p.shape) if p.shape else 1) for p in m.parameters]
    total = sum(n for _, n in sized)
    if total == 0:
        return []
    under = sum(p.fp16_underflow_fraction * n for p, n in sized)
    share = under / total
    if share < t["fp16_underflow_fraction"]:
        return []
    worst = sorted(
        (p for p, _ in sized if p.fp16_underflow_fraction > 0),
        key=lambda p: -p.fp16_underflow_fraction,
    )
    in_fp16 = precision == "fp16"
    severity: Severity = "info"
    if in_fp16:
        severity = "error" if share >= t["fp16_underflow_fraction_error"] else "warning"
    return [
        Finding(
            kind="fp16_underflow",
            severity=severity,
            message=(
                (
                    f"{sig(share)} of all gradient entries were flushed to zero by this fp16 "
                    f"pass (they are non-zero in an fp32 pass of the same batch)"
                    if precision == "fp16"
                    else f"If you train in fp16: {sig(share)} of all gradient entries are below "
                    f"fp16's smallest value (2^-24) and would be flushed to zero (this {precision} "
                    f"run is not affected)"
                )
                + (f", worst in {worst[0].name}" if worst else "")
                + "."
            ),
            layers=list(dict.fromkeys(p.layer for p in worst if p.layer)),
            evidence={
                "underflow_fraction": share,
                "precision": precision,
                "forecast": not in_fp16,
                "parameters": {p.name: p.fp16_underflow_fraction for p in worst[:10]},
                "min_nonzero_grad_norm": min(
                    (p.grad_norm for p, _ in sized if p.grad_norm), default=None
                ),
            },
        )
    ]


def no_parameter_findings(m: Measurements) -> list[Finding]:
    if m.parameters:
        return []
    return [
        Finding(
            kind="no_trainable_parameters",
            severity="error",
            message=(
                "The model has no trainable parameters, so there is no gradient to diagnose; "
                "export it with its weights as parameters (not constants)."
            ),
        )
    ]
