"""The report's tables: layers, parameters, and the model / batch / conversion / timing facts."""

from __future__ import annotations

from service.api.pages.formatting import esc, num, seconds
from service.engine.report import Report, TensorSpec

OPEN_ROWS = 60  # longer tables start folded


def _fold(title: str, count: int, table: str) -> str:
    state = " open" if count <= OPEN_ROWS else ""
    return f"<details{state}><summary>{esc(title)} ({count})</summary>{table}</details>"


def _n(value: object) -> str:
    return f'<td class="n">{esc(num(value))}</td>'


def layers_table(report: Report) -> str:
    if not report.layers:
        return ""
    rows = []
    for layer in report.layers:
        stats = layer.activation_stats
        rows.append(
            f'<tr><td class="n">{layer.depth}</td><td class="code">{esc(layer.name)}</td>'
            f'<td class="code">{esc(layer.op)}</td><td class="code">{esc(stats.activation or "")}'
            f"</td>{_n(layer.activation_grad_norm)}{_n(layer.grad_norm)}{_n(layer.weight_norm)}"
            f"{_n(layer.grad_to_weight)}{_n(layer.init_std_ratio)}{_n(stats.dead_fraction)}"
            f"{_n(stats.saturated_fraction)}</tr>"
        )
    table = (
        '<table class="layers"><tr><th class="n">depth</th><th>layer</th><th>op</th>'
        '<th>activation</th><th class="n">‖∂L/∂a‖</th><th class="n">‖∂L/∂W‖</th>'
        '<th class="n">‖W‖</th><th class="n">grad/weight</th><th class="n">init std ratio</th>'
        '<th class="n">dead</th><th class="n">saturated</th></tr>'
        f"{''.join(rows)}</table>"
    )
    return f'<section id="layers"><h2>Layers</h2>{_fold("layers", len(rows), table)}</section>'


def parameters_table(report: Report) -> str:
    if not report.parameters:
        return ""
    rows = []
    for p in report.parameters:
        bad = ' class="bad"' if p.non_finite else ""
        non_finite = f"yes ({p.non_finite_count})" if p.non_finite else "no"
        shape = "×".join(str(d) for d in p.shape) or "scalar"
        rows.append(
            f'<tr{bad}><td class="code">{esc(p.name)}</td><td class="code">{esc(shape)}</td>'
            f'<td class="code">{esc(p.layer or "")}</td>{_n(p.grad_norm)}{_n(p.weight_norm)}'
            f"{_n(p.grad_to_weight)}<td>{non_finite}</td>{_n(p.fp16_underflow_fraction)}</tr>"
        )
    table = (
        '<table class="parameters"><tr><th>parameter</th><th>shape</th><th>layer</th>'
        '<th class="n">‖∂L/∂W‖</th><th class="n">‖W‖</th><th class="n">grad/weight</th>'
        '<th>non-finite</th><th class="n">fp16 underflow</th></tr>'
        f"{''.join(rows)}</table>"
    )
    return (
        '<section id="parameters"><h2>Parameters</h2>'
        f"{_fold('trainable tensors', len(rows), table)}</section>"
    )


def quantizers_table(report: Report) -> str:
    """The fake quantisers of a QAT model: range, what the batch spans, the clamped share."""
    if not report.quantizers:
        return ""
    flagged = {
        name
        for f in report.findings
        if f.kind == "quantizer_clipping"
        for name in f.evidence.get("clipped_fraction", {})
    }
    rows = []
    for q in report.quantizers:
        what = ", ".join(q.parameters) if q.quantizes == "weight" else (q.layer or q.input)
        bad = ' class="bad"' if q.name in flagged else ""
        widest = " (widest channel)" if q.per_channel else ""
        rows.append(
            f'<tr{bad}><td class="code">{esc(q.name)}</td><td>{esc(q.quantizes)}</td>'
            f'<td class="code">{esc(what)}</td>'
            f"<td>[{esc(num(q.range_min))}, {esc(num(q.range_max))}]{widest}</td>"
            f"{_n(q.input_min)}{_n(q.input_max)}{_n(q.clipped_fraction)}</tr>"
        )
    table = (
        '<table class="quantizers"><tr><th>quantiser</th><th>quantises</th><th>of</th>'
        '<th>range</th><th class="n">batch min</th><th class="n">batch max</th>'
        '<th class="n">clipped</th></tr>'
        f"{''.join(rows)}</table>"
    )
    return (
        '<section id="quantizers"><h2>Fake quantisers</h2>'
        f"{_fold('quantisers', len(rows), table)}</section>"
    )


def _specs(specs: list[TensorSpec]) -> str:
    return "<br>".join(
        f'<span class="mono">{esc(s.name)}</span> '
        f"[{esc(', '.join('?' if d is None else str(d) for d in s.shape))}] {esc(s.dtype)}"
        for s in specs
    )


def _kv(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def facts_section(report: Report) -> str:
    model = report.model
    coverage = esc(model.probe_coverage) + (
        f" — {esc(model.probe_coverage_reason)}" if model.probe_coverage_reason else ""
    )
    model_rows = [
        ("format", esc(model.format) + (f" (opset {model.opset})" if model.opset else "")),
        ("sha256", f'<span class="mono">{esc(model.sha256)}</span>'),
        ("inputs", _specs(model.inputs)),
        ("outputs", _specs(model.outputs)),
        ("trainable parameters", esc(num(model.parameter_count))),
        ("probe coverage", coverage),
    ]
    conversion = model.conversion
    if conversion is not None:
        if conversion.checked:
            text = (
                f"max abs error {esc(num(conversion.max_abs_error))}, max rel error "
                f"{esc(num(conversion.max_rel_error))} against {esc(conversion.reference or '')}"
            )
            if conversion.reason:  # what the comparison did and why its errors are what they are
                text += f'<div class="muted">{esc(conversion.reason)}</div>'

        else:
            text = f"not checked: {esc(conversion.reason or '')}"
        model_rows.append(("ONNX conversion check", text))
    loss = report.loss
    run_rows = [
        (
            "batch",
            f"{report.batch.size} example(s); "
            + ", ".join(
                f'<span class="mono">{esc(a.name)}</span> [{esc(", ".join(map(str, a.shape)))}] '
                f"{esc(a.dtype)} ({esc(a.role)})"
                for a in report.batch.arrays
            ),
        ),
        (
            "loss",
            f"{esc(loss.kind)} = {esc(num(loss.value))}"
            + (f" <span class='muted'>({esc(loss.reason)})</span>" if loss.reason else ""),
        ),
        ("device", esc(report.device) + f" — {esc(report.environment.device_name)}"),
        ("mode / precision", f"{esc(report.mode)} / {esc(report.precision)}"),
        ("micro-batches", str(report.micro_batches)),
    ]
    timing = report.timing
    timing_rows = [
        (name, esc(seconds(getattr(timing, name))))
        for name in ("load", "convert", "forward", "backward", "analysis", "verification", "total")
    ]
    env = report.environment
    env_rows = [
        ("gradhealth", esc(env.gradhealth)),
        ("torch", esc(env.torch)),
        ("onnx / onnxruntime", f"{esc(env.onnx or '—')} / {esc(env.onnxruntime or '—')}"),
        ("report version", esc(report.report_version)),
    ]
    notes = (
        "<h3>Notes</h3><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report.notes) + "</ul>"
        if report.notes
        else ""
    )
    return (
        '<section id="facts"><h2>Model and run</h2>'
        f'<div class="card"><h3>Model</h3>{_kv(model_rows)}</div>'
        f'<div class="card"><h3>Run</h3>{_kv(run_rows)}</div>'
        f'<div class="card"><h3>Timing</h3>{_kv(timing_rows)}</div>'
        f'<div class="card"><h3>Environment</h3>{_kv(env_rows)}{notes}</div></section>'
    )
