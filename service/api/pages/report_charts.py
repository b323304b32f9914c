"""The report's charts: the depth profile, the per-time-step profiles of recurrent inputs, the
per-layer dead/saturated fractions and the fake quantisers' clipped shares, each with the
detectors' thresholds drawn.

The API never imports the engine's detectors (they import torch), so the defaults of the few
thresholds drawn here are mirrored from service/engine/detectors/thresholds.py;
tests/api/test_report_page.py checks that they agree. A diagnosis's own overrides
(`options.thresholds`) win.
"""

from __future__ import annotations

from typing import Any

from service.api.pages.formatting import as_float, esc, num
from service.api.pages.svg_charts import Point, Threshold, fraction_bars, log_profile
from service.engine.report import QuantizerReport, Report

CHART_THRESHOLDS: dict[str, float] = {
    "vanishing_profile_ratio": 1e-3,
    "vanishing_profile_ratio_warning": 1e-2,
    "exploding_profile_ratio": 70.0,
    "exploding_profile_ratio_warning": 10.0,
    "vanishing_time_ratio": 1e-3,
    "exploding_time_ratio": 70.0,
    "saturation_fraction_warning": 0.2,
    "saturation_fraction_error": 0.5,
    "dead_fraction_warning": 0.4,
    "dead_fraction_error": 0.7,
    "quantizer_clipping_warning": 0.01,
    "quantizer_clipping_error": 0.1,
}


def chart_thresholds(options: dict[str, Any]) -> dict[str, float]:
    overrides = options.get("thresholds") if isinstance(options, dict) else None
    values = dict(CHART_THRESHOLDS)
    for name, value in (overrides or {}).items():
        number = as_float(value)
        if name in values and number is not None:
            values[name] = number
    return values


def _card(svg: str, heading: str, caption: str, css_id: str) -> str:
    return (
        f'<div class="card chart-card" id="{css_id}"><h3>{esc(heading)}</h3>{svg}'
        f'<p class="caption">{caption}</p></div>'
    )


def _last_positive(values: list[float | None]) -> float | None:
    for value in reversed(values):
        if value is not None and 0 < value < float("inf"):
            return value
    return None


def depth_chart(report: Report, limits: dict[str, float]) -> str:
    profile = report.profiles.depth
    if not profile.layers:
        return ""
    flagged = {
        name
        for f in report.findings
        if f.kind in ("vanishing_gradients", "exploding_gradients", "non_finite")
        and f.evidence.get("axis", "depth") == "depth"
        for name in f.layers
    }
    values = [as_float(v) for v in profile.grad_norms]
    points = [
        Point(name, values[i] if i < len(values) else None, name in flagged)
        for i, name in enumerate(profile.layers)
    ]
    reference = _last_positive(values)
    lines = []
    if reference is not None and len(points) > 1:
        lines = [
            Threshold(reference * limits["exploding_profile_ratio"], "exploding (error)", "error"),
            Threshold(
                reference * limits["exploding_profile_ratio_warning"],
                "exploding (warning)",
                "warning",
            ),
            Threshold(
                reference * limits["vanishing_profile_ratio_warning"],
                "vanishing (warning)",
                "warning",
            ),
            Threshold(reference * limits["vanishing_profile_ratio"], "vanishing (error)", "error"),
        ]
    svg = log_profile(
        points,
        title="Gradient norm by depth",
        x_title="layer (input → output)",
        y_title="‖∂L/∂a‖ (log)",
        thresholds=lines,
        css_class="depth-profile",
    )
    fit = (
        f" Fitted growth ×{esc(num(profile.growth_factor))} per layer towards the output;"
        f" first/last ratio {esc(num(profile.first_last_ratio))}."
        if profile.growth_factor is not None
        else ""
    )
    left_out = (
        f" {profile.layers_left_out} layer(s) without a measured ‖∂L/∂a‖ are left out: "
        f"{esc(', '.join(profile.left_out))}."
        if profile.layers_left_out
        else ""
    )
    non_finite = sum(1 for v in values if v is not None and (v != v or abs(v) == float("inf")))
    if non_finite:
        left_out += f" × marks {non_finite} layer(s) whose norm is NaN or infinite."
    caption = (
        "Norm of the loss gradient with respect to each layer's output. Dashed lines: the "
        "vanishing/exploding thresholds on the first layer's norm, relative to the last "
        "layer's (exploding also needs compounding growth per layer). Red points: layers a "
        f"finding names.{fit}{left_out}"
    )
    return _card(svg, "Depth profile", caption, "chart-depth")


def time_charts(report: Report, limits: dict[str, float]) -> list[str]:
    cards = []
    for profile in report.profiles.time:
        values = [as_float(v) for v in profile.grad_norms]
        if not values:
            continue
        points = [Point(str(step), value) for step, value in enumerate(values)]
        reference = _last_positive(values)
        lines = (
            [
                Threshold(reference * limits["exploding_time_ratio"], "exploding", "error"),
                Threshold(reference * limits["vanishing_time_ratio"], "vanishing", "error"),
            ]
            if reference is not None
            else []
        )
        svg = log_profile(
            points,
            title=f"Gradient norm per time step of {profile.input}",
            x_title=f"time step (axis {profile.axis} of input '{profile.input}')",
            y_title="‖∂L/∂x_t‖ (log)",
            thresholds=lines,
            by_index=True,
            css_class="time-profile",
        )
        zeros = sum(1 for v in values if v == 0)
        caption = (
            f"Norm of {esc(profile.tensor or 'the gradient')} at each time step. "
            "Dashed lines: the thresholds on the first step's norm relative to the last's."
            + (
                f" Per-step factor ×{esc(num(profile.growth_factor))}."
                if profile.growth_factor is not None
                else ""
            )
            + (
                f" ▽ marks {zeros} step(s) whose gradient underflowed to exactly 0."
                if zeros
                else ""
            )
        )
        cards.append(_card(svg, f"Time profile: {profile.input}", caption, "chart-time"))
    return cards


def fraction_charts(report: Report, limits: dict[str, float]) -> list[str]:
    cards = []
    specs = [
        ("dead_fraction", "Dead units", "dead", "ReLU-like"),
        ("saturated_fraction", "Saturated units", "saturation", "sigmoid/tanh-like"),
    ]
    for attribute, heading, key, family in specs:
        points = [
            Point(layer.name, value)
            for layer in report.layers
            if (value := as_float(getattr(layer.activation_stats, attribute))) is not None
        ]
        if not points:
            continue
        svg = fraction_bars(
            points,
            title=f"{heading} per layer",
            x_title="layer (input → output)",
            y_title="fraction of units",
            thresholds=[
                Threshold(limits[f"{key}_fraction_warning"], "warning", "warning"),
                Threshold(limits[f"{key}_fraction_error"], "error", "error"),
            ],
            css_class=attribute.replace("_", "-"),
        )
        what = (
            "units that output zero for every example of the batch (they get no gradient)"
            if key == "dead"
            else "activation entries whose local derivative is below 0.01"
        )
        caption = f"Share of {what}, for {family} layers."
        cards.append(_card(svg, heading, caption, f"chart-{key}"))
    return cards


def quantizer_label(q: QuantizerReport) -> str:
    """What a quantiser quantises, short: `layers.0` (its output), `head.weight`, `x`."""
    if q.quantizes == "weight" and q.parameters:
        return q.parameters[0]
    return q.layer or q.input


def clipping_chart(report: Report, limits: dict[str, float]) -> str:
    """The share each fake quantiser clamps (QAT models), in execution order."""
    labels = [quantizer_label(q) for q in report.quantizers]
    if len(set(labels)) < len(labels):  # two quantisers of one layer: their node names
        labels = [q.name for q in report.quantizers]
    points = [
        Point(label, value)
        for label, q in zip(labels, report.quantizers, strict=True)
        if (value := as_float(q.clipped_fraction)) is not None
    ]
    if not points:
        return ""
    svg = fraction_bars(
        points,
        title="Clipped share per fake quantiser",
        x_title="what each quantiser quantises (execution order)",
        y_title="fraction clamped",
        thresholds=[
            Threshold(limits["quantizer_clipping_warning"], "warning", "warning"),
            Threshold(limits["quantizer_clipping_error"], "error", "error"),
        ],
        css_class="clipped-fraction",
    )
    caption = (
        "Share of what each quantiser quantises that falls outside its range: clamped in the "
        "forward pass, with no gradient through the straight-through estimator."
    )
    return _card(svg, "Quantiser clipping", caption, "chart-clipping")


def charts_section(report: Report, options: dict[str, Any]) -> str:
    limits = chart_thresholds(options)
    cards = [depth_chart(report, limits), *time_charts(report, limits)]
    cards += fraction_charts(report, limits)
    cards.append(clipping_chart(report, limits))
    cards = [c for c in cards if c]
    if not cards:
        return ""
    return '<section id="charts"><h2>Gradient profiles</h2>' + "\n".join(cards) + "</section>"
