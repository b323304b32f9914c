"""Per-layer unit health: saturated sigmoid/tanh, dead ReLUs, weight scale at initialisation."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

from service.engine.detectors.optypes import is_embedding, is_normalization
from service.engine.detectors.profile import sig
from service.engine.layers import he_std, scales_one_input, weight_fans, xavier_std
from service.engine.measurements import Measurements
from service.engine.report import Finding, FindingKind, LayerReport


def _by_depth(m: Measurements) -> list[LayerReport]:
    return sorted(m.layers, key=lambda layer: layer.depth)


def normalized_layers(m: Measurements) -> set[str]:
    """Layers whose output only a normalisation reads: their scale is divided out, so their
    initialisation scale does not matter. From the graph when measured; else (hand-built
    measurements) each layer just before a normalisation layer in depth order."""
    if m.normalized is not None:
        return set(m.normalized)
    layers = _by_depth(m)
    return {x.name for x, nxt in itertools.pairwise(layers) if is_normalization(nxt.op)}


def init_ratio(layer: LayerReport, m: Measurements) -> float | None:
    """The layer's weight std over the He/Xavier std for its fan-in.

    The measurement's `init_std_ratio` when it has one. Without it (parameters-only coverage:
    the activation after the layer is not visible, so He vs Xavier is unknown) the weight is
    compared with the reference that makes it look least wrong: above 1 only if it is larger
    than He's std (the larger one), below 1 only if it is smaller than Xavier's.
    """
    if layer.init_std_ratio is not None:
        return layer.init_std_ratio
    if not layer.fan_in or scales_one_input(layer.fan_in):
        return None
    shapes = {p.name: p for p in m.parameters}
    weight = next(
        (shapes[n] for n in layer.params if n in shapes and len(shapes[n].shape) >= 2), None
    )
    if weight is None or not weight.weight_norm:
        return None
    std = weight.weight_norm / math.sqrt(math.prod(weight.shape))
    # torch's fans from the shape (no groups seen here), as the re-initialisation's fallback
    fan_in, fan_out = weight_fans(weight.shape)
    he, xavier = he_std(fan_in), xavier_std(fan_in, fan_out)
    if std > he:
        return std / he
    if std < xavier:
        return std / xavier
    return 1.0


def _worst_fraction_finding(
    m: Measurements,
    t: dict[str, float],
    *,
    kind: FindingKind,
    fraction_of: Callable[[LayerReport], float | None],
    evidence_key: str,
    threshold: str,
    message: Callable[[int, LayerReport, float], str],
) -> list[Finding]:
    """One finding over the layers whose fraction (`fraction_of`) reaches
    `t[threshold + "_warning"]`, an error when the worst reaches `t[threshold + "_error"]`;
    the fractions are the evidence under `evidence_key`. `message(count, worst layer, worst
    fraction)` says what is wrong."""
    hits = [
        (x, fraction)
        for x in _by_depth(m)
        if (fraction := fraction_of(x)) is not None and fraction >= t[f"{threshold}_warning"]
    ]
    if not hits:
        return []
    hits.sort(key=lambda p: -p[1])
    worst, worst_fraction = hits[0]
    error = worst_fraction >= t[f"{threshold}_error"]
    return [
        Finding(
            kind=kind,
            severity="error" if error else "warning",
            message=message(len(hits), worst, worst_fraction),
            layers=[x.name for x, _ in hits],
            evidence={
                evidence_key: {x.name: f for x, f in hits},
                "activation": {x.name: x.activation_stats.activation for x, _ in hits},
                "worst_fraction": worst_fraction,
            },
        )
    ]


def saturation_findings(m: Measurements, t: dict[str, float]) -> list[Finding]:
    def message(count: int, worst: LayerReport, fraction: float) -> str:
        act = worst.activation_stats.activation or "activation"
        return (
            f"{count} layer(s) saturate: {sig(fraction)} of the {act} outputs of "
            f"{worst.name} sit where its derivative is near zero, so almost no gradient "
            f"passes them."
        )

    return _worst_fraction_finding(
        m,
        t,
        kind="saturation",
        fraction_of=lambda x: x.activation_stats.saturated_fraction,
        evidence_key="saturated_fraction",
        threshold="saturation_fraction",
        message=message,
    )


def unit_share(fraction: float) -> str:
    """A share of a layer's units for a message: "all", else a percentage that reads 100%
    only when it is all ("1 of the units" read as one unit when it meant every one)."""
    if fraction >= 1.0:
        return "all"
    percent = 100.0 * fraction
    for digits in (3, 4, 5, 6):
        text = f"{percent:.{digits}g}"
        if float(text) < 100.0:
            return f"{text}%"
    return "all but a few"


def dead_unit_findings(m: Measurements, t: dict[str, float]) -> list[Finding]:
    def message(count: int, worst: LayerReport, fraction: float) -> str:
        return (
            f"{count} layer(s) have dead units: {unit_share(fraction)} of the units of "
            f"{worst.name} output zero for every example of the batch and get no gradient."
        )

    return _worst_fraction_finding(
        m,
        t,
        kind="dead_units",
        fraction_of=lambda x: x.activation_stats.dead_fraction,
        evidence_key="dead_fraction",
        threshold="dead_fraction",
        message=message,
    )


def _between_xaviers_ends(layer: LayerReport, ratio: float) -> float:
    """The ratio to Xavier's std, judged against the nearer end of the range it balances:
    Glorot & Bengio's sqrt(2/(fan_in + fan_out)) lies between 1/√fan_out (the backward
    pass's variance kept) and 1/√fan_in (the forward pass's), and a weight anywhere between
    keeps one of them. For a layer that widens much (a first conv of 1 channel into 32 of
    5×5: fan-in 25, fan-out 800) torch's default init is 2.4× Xavier's and ~0.6 of
    1/√fan_in: healthy. Equal fans: the ratio itself."""
    if layer.init_reference != "xavier" or not layer.fan_in or not layer.fan_out:
        return ratio
    fans = layer.fan_in + layer.fan_out
    end = min(layer.fan_in, layer.fan_out) if ratio > 1 else max(layer.fan_in, layer.fan_out)
    # the end's std over Xavier's: sqrt((fan_in + fan_out) / (2 · end's fan))
    return ratio / math.sqrt(fans / (2 * end))


def _reference_text(layer: LayerReport) -> str:
    """What the layer's weight std was compared with (measure.py `init_reference`)."""
    if layer.init_reference == "he":
        return f"what He initialisation gives for its fan-in of {layer.fan_in}"
    if layer.init_reference == "xavier" and layer.fan_out:
        return (
            f"what Xavier initialisation gives for its fan-in of {layer.fan_in} and fan-out "
            f"of {layer.fan_out}"
        )
    if layer.init_reference == "recurrent":
        return "1/√H, the std of an orthogonal recurrent matrix's rows"
    return f"what He/Xavier initialisation gives for its fan-in of {layer.fan_in}"


def init_scale_findings(
    m: Measurements, t: dict[str, float], zero_by_design: frozenset[str] = frozenset()
) -> list[Finding]:
    """`zero_by_design`: exactly-zero parameters that block the gradient to the layers before
    them at initialisation on purpose (gradients.zero_init_blocked: an STN's identity head,
    LoRA's B, a zero-gamma residual): a zero start, not too small an initialisation."""
    layers = _by_depth(m)
    too_small: list[LayerReport] = []
    too_large: list[LayerReport] = []
    ratios: dict[str, float] = {}
    judged: dict[str, float] = {}  # the ratios as judged (`_between_xaviers_ends`)
    # an output projection tied to the input embedding has the embedding's scale (T5's is
    # N(0, 1), its input scaled by d_model^-0.5 instead): not judged by a linear's fan-in
    tables = {p for layer in layers if is_embedding(layer.op) for p in layer.params}
    scale_free = normalized_layers(m)  # the normalisation divides their scale out
    seen: set[tuple[str, ...]] = set()  # a module called again (`block#2`) is one weight
    for layer in layers:
        r = init_ratio(layer, m)
        if r is None or is_normalization(layer.op) or tables & set(layer.params):
            continue
        if zero_by_design & set(layer.params):  # its weight is exactly 0 (the bias may not be)
            continue
        weights = tuple(sorted(layer.params))
        if weights in seen:
            continue
        seen.add(weights)
        if layer.name in scale_free:
            continue
        ratios[layer.name] = r
        judged[layer.name] = _between_xaviers_ends(layer, r)
        if judged[layer.name] < t["init_ratio_low"]:
            too_small.append(layer)
        elif judged[layer.name] > t["init_ratio_high"]:
            too_large.append(layer)
    findings: list[Finding] = []
    for group, direction in ((too_small, "small"), (too_large, "large")):
        if not group:
            continue
        sign = 1.0 if direction == "small" else -1.0
        group = sorted(group, key=lambda x: sign * judged[x.name])
        worst = group[0]
        r = ratios[worst.name]
        j = judged[worst.name]
        error = j < t["init_ratio_error_low"] or j > t["init_ratio_error_high"]
        findings.append(
            Finding(
                kind="init_scale",
                severity="error" if error else "warning",
                message=(
                    f"{len(group)} layer(s) are initialised too {direction}: the weight std of "
                    f"{worst.name} is {sig(r)}× {_reference_text(worst)}; re-initialise them."
                ),
                layers=[x.name for x in group],
                evidence={
                    "direction": direction,
                    "init_std_ratio": {x.name: ratios[x.name] for x in group},
                    # the ratio as judged, worst first (`layers`' order): a Xavier layer's
                    # against the nearer end of the range it balances, so a head narrowing
                    # 32 → 4 at 4.2× Xavier's std is judged 2× and comes after a 4.16× He one
                    "judged_ratio": {x.name: judged[x.name] for x in group},
                    "fan_in": {x.name: x.fan_in for x in group},
                    "worst_ratio": r,
                    "worst_judged_ratio": j,
                },
            )
        )
    return findings
