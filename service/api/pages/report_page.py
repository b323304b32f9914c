"""`GET /v1/diagnoses/{id}/report.html`: the diagnosis as one self-contained page.

Succeeded: the verdict and summary on top, then findings (worst first), recommendations,
charts, layer and parameter tables, and the model/run facts. Any other status: a status page
(`status_page.py`).
"""

from __future__ import annotations

from pydantic import ValidationError

from service.api.pages.formatting import esc, num, plural, seconds
from service.api.pages.layout import page
from service.api.pages.report_charts import charts_section
from service.api.pages.report_findings import (
    findings_section,
    ranked,
    recommendations_section,
)
from service.api.pages.report_tables import (
    facts_section,
    layers_table,
    parameters_table,
    quantizers_table,
)
from service.api.pages.status_page import render_status
from service.api.pages.view import DiagnosisView, when
from service.engine.report import Report

VERDICT_LABELS = {"healthy": "Healthy", "at_risk": "At risk", "unhealthy": "Unhealthy"}


def render_page(view: DiagnosisView) -> str:
    if view.status != "succeeded" or view.report is None:
        return render_status(view)
    try:
        report = Report.model_validate(view.report)
    except ValidationError as exc:
        return _unreadable(view, exc)
    body = "\n".join(
        [
            _summary(view, report),
            findings_section(report.findings),
            charts_section(report, view.options),
            recommendations_section(report.recommendations, report.findings),
            layers_table(report),
            quantizers_table(report),
            parameters_table(report),
            facts_section(report),
            f"<footer>diagnosis {esc(view.id)} · report created {esc(when(report.created_at))} · "
            f"JSON at /v1/diagnoses/{esc(view.id)}</footer>",
        ]
    )
    verdict = VERDICT_LABELS.get(report.verdict, report.verdict)
    return page(f"{verdict}: {view.title} — gradhealth report", body, where=f"diagnosis {view.id}")


def _counts(report: Report) -> str:
    counts = {level: 0 for level in ("error", "warning", "info")}
    for finding in report.findings:
        counts[finding.severity] += 1
    parts = [plural(n, level) for level, n in counts.items() if n]
    return ", ".join(parts) if parts else "no findings"


def _summary(view: DiagnosisView, report: Report) -> str:
    ordered = ranked(report.findings)
    if ordered:
        lead = esc(ordered[0][1].message)
    else:
        lead = "No vanishing, exploding or non-finite gradients, dead or saturated units found."
    fix = ""
    if report.recommendations:
        first = report.recommendations[0]
        fix = (
            '<p class="muted">Top recommendation: <a href="#rec-1">'
            f"{esc(first.fix.replace('_', ' '))}</a></p>"
        )
    facts = [
        ("format", report.model.format),
        ("parameters", num(report.model.parameter_count)),
        ("layers", str(len(report.layers))),
        ("batch", str(report.batch.size)),
        ("loss", f"{report.loss.kind} = {num(report.loss.value)}"),
        ("device", report.device),
        ("mode", report.mode),
        ("precision", report.precision),
        ("took", seconds(report.timing.total)),
    ]
    chips = "".join(f'<span class="fact">{esc(k)} <b>{esc(v)}</b></span>' for k, v in facts)
    verdict = VERDICT_LABELS.get(report.verdict, report.verdict)
    return (
        '<section class="card summary" id="summary">'
        f'<div class="verdict {esc(report.verdict)}">{esc(verdict)}</div>'
        f'<div class="text"><h1>{esc(view.title)}</h1>'
        f'<div class="muted">{esc(_counts(report))} · finished {esc(when(view.finished_at))}'
        f"</div>"
        f'<p class="lead">{lead}</p>{fix}<div class="facts">{chips}</div></div></section>'
    )


def _unreadable(view: DiagnosisView, exc: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
    )
    body = (
        '<div class="card status"><span class="pill error">Unreadable report</span>'
        f'<div class="big">{esc(view.title)}</div>'
        "<p>This diagnosis succeeded, but its stored report does not match the report schema "
        "this server draws pages from (was it written by another gradhealth version?). "
        f"The JSON is at /v1/diagnoses/{esc(view.id)}.</p>"
        f'<div class="error-box">{esc(problems)}</div></div>'
    )
    return page(f"Unreadable report: {view.title}", body, where=f"diagnosis {view.id}")
