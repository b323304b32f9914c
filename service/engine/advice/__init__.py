"""Advice: ranked recommendations (CONTRACT.md §3 `recommendations`) from the findings.

    recommend(findings, m, subject, options) -> list[Recommendation]

Each recommendation names the layers and the numbers that justify it (`rationale`), carries a
short PyTorch snippet and `addresses` = the indexes of the findings it answers. No finding, no
recommendation. Ranked: the worst severity addressed first, then causes before symptoms
(see `rules.PRIORITY`). With a Subject and `options.verify_fixes` (the default), each
recommendation with an automatic transform is then tried on a copy of the model and measured
again (`service.engine.verify`), which fills `verified`.
"""

from __future__ import annotations

from service.engine.advice.rules import Advisor
from service.engine.detectors.frozen import trained_part
from service.engine.measurements import Measurements, Subject
from service.engine.options import DiagnoseOptions
from service.engine.report import SEVERITY_RANK, Finding, Recommendation

__all__ = ["recommend"]


def recommend(
    findings: list[Finding],
    m: Measurements,
    subject: Subject | None = None,
    options: DiagnoseOptions | None = None,
) -> list[Recommendation]:
    # about what training updates only, as the findings are (detectors/frozen.py)
    m = trained_part(m)
    graph = subject.graph if subject is not None else None
    thresholds = options.thresholds if options is not None else None
    precision = m.precision  # the effective one (an fp16 model is fp16 whatever was asked)
    recommendations = Advisor(findings, m, graph, thresholds, precision).recommendations()
    if subject is not None and options is not None and options.verify_fixes:
        from service.engine.verify import verify_recommendations

        verify_recommendations(recommendations, findings, m, subject, options)
        recommendations = _verified_first(recommendations, findings)
    return recommendations


def _verified_first(recs: list[Recommendation], findings: list[Finding]) -> list[Recommendation]:
    """Within one severity tier, a fix shown to resolve its findings goes before one that did
    not; otherwise the advice order stands (sort is stable)."""

    def key(r: Recommendation) -> tuple[int, int]:
        worst = max(
            (SEVERITY_RANK[findings[i].severity] for i in r.addresses if isinstance(i, int)),
            default=0,
        )
        resolved = r.verified is not None and r.verified.resolved is True
        return (-worst, 0 if resolved else 1)

    return sorted(recs, key=key)
