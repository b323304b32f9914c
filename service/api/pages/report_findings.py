"""Findings ranked by severity with their evidence, and the ranked recommendations with their
snippets and, when a fix was tried on a copy of the model, its before/after figures."""

from __future__ import annotations

from typing import Any

from service.api.pages.formatting import as_float, esc, num
from service.engine.report import SEVERITY_RANK, Finding, Recommendation, Verification

MAX_CHIPS = 24
MAX_EVIDENCE_ITEMS = 24


TITLES = {
    "non_finite": "Non-finite values (NaN/Inf)",
    "fp16_underflow": "fp16 underflow",
    "init_scale": "Initialisation scale",
    "use_bf16": "Use bf16",
    "quantizer_clipping": "Quantiser clipping",
    "recalibrate_quantizers": "Recalibrate quantisers",
    "straight_through_estimator": "Straight-through estimator",
}


def title_of(kind: str) -> str:
    return TITLES.get(kind, kind.replace("_", " ").capitalize())


def chips(names: list[str], css: str = "chips") -> str:
    shown = "".join(f'<span class="chip">{esc(n)}</span>' for n in names[:MAX_CHIPS])
    more = (
        f'<span class="muted">+{len(names) - MAX_CHIPS} more</span>'
        if len(names) > MAX_CHIPS
        else ""
    )
    return f'<div class="{css}">{shown}{more}</div>' if names else ""


def _value(value: Any) -> str:
    if value is None:
        return '<span class="muted">—</span>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    if as_float(value) is not None:
        return esc(num(value))
    if isinstance(value, list):
        if not value:
            return '<span class="muted">none</span>'
        return ", ".join(_value(v) for v in value[:MAX_EVIDENCE_ITEMS]) + (
            " …" if len(value) > MAX_EVIDENCE_ITEMS else ""
        )
    if isinstance(value, dict):
        if not value:
            return '<span class="muted">none</span>'
        items = list(value.items())
        inner = "; ".join(
            f'<span class="mono">{esc(k)}</span> {_value(v)}' for k, v in items[:MAX_EVIDENCE_ITEMS]
        )
        return inner + (" …" if len(items) > MAX_EVIDENCE_ITEMS else "")
    return esc(value)


# What the NaN/Inf origin's inputs and output held (origin.OriginRecorder's counts): columns
_ORIGIN_COUNTS = [
    ("numel", "entries"),
    ("min", "min"),
    ("max", "max"),
    ("nan", "NaN"),
    ("posinf", "+Inf"),
    ("neginf", "−Inf"),
    ("zero", "zero"),
    ("negative", "negative"),
]


def _origin(origin: dict[str, Any]) -> str:
    node = esc(origin.get("node"))
    op = esc(origin.get("op_type"))
    phase = esc(origin.get("phase"))
    layer = f", in layer {esc(origin['layer'])}" if origin.get("layer") else ""
    shown = ("node", "op_type", "phase", "layer", "value", "values")
    more = "; ".join(
        f'<span class="mono">{esc(k)}</span> {_value(v)}'
        for k, v in origin.items()
        if k not in shown and v not in (None, {}, [])
    )
    extra = f"<br>{more}" if more else ""
    values = origin.get("values")
    table = _origin_values(values) if isinstance(values, dict) else ""
    return f'node <span class="mono">{node}</span> ({op}), {phase} pass{layer}{extra}{table}'


def _origin_values(values: dict[str, Any]) -> str:
    """One row per input of the origin op and one for its output, with their counts."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for item in values.get("inputs") or []:
        if isinstance(item, dict):
            source = item.get("source") or item.get("value")
            rows.append((f'input <span class="mono">{esc(source)}</span>', item))
    if isinstance(values.get("output"), dict):
        rows.append(("output", values["output"]))
    if not rows:
        return ""
    head = "".join(f"<th>{label}</th>" for _, label in _ORIGIN_COUNTS)
    body = "".join(
        f"<tr><th>{name}</th>"
        + "".join(f"<td>{_value(counts.get(key))}</td>" for key, _ in _ORIGIN_COUNTS)
        + "</tr>"
        for name, counts in rows
    )
    return f'<table class="origin"><tr><th></th>{head}</tr>{body}</table>'


def evidence_table(evidence: dict[str, Any]) -> str:
    rows = []
    for key, value in evidence.items():
        is_origin = key == "origin" and isinstance(value, dict)
        shown = _origin(value) if is_origin else _value(value)
        wide = ' class="wide"' if is_origin and value.get("values") else ""
        rows.append(f"<div{wide}><dt>{esc(key.replace('_', ' '))}</dt><dd>{shown}</dd></div>")
    if not rows:
        return ""
    return f'<dl class="evidence">{"".join(rows)}</dl>'


def ranked(findings: list[Finding]) -> list[tuple[int, Finding]]:
    """(index in the report, finding), worst severity first, report order within one."""
    indexed = list(enumerate(findings))
    return sorted(indexed, key=lambda item: -SEVERITY_RANK[item[1].severity])


def findings_section(findings: list[Finding]) -> str:
    if not findings:
        return (
            '<section id="findings"><h2>Findings</h2><div class="card">No gradient problem '
            "found: every detector stayed under its thresholds.</div></section>"
        )
    cards = []
    for index, finding in ranked(findings):
        cards.append(
            f'<div class="card finding {finding.severity}" id="finding-{index}">'
            f'<div class="head"><span class="pill {finding.severity}">{finding.severity}</span>'
            f'<span class="kind">{esc(title_of(finding.kind))}</span></div>'
            f'<p class="message">{esc(finding.message)}</p>'
            f"{chips(finding.layers)}{evidence_table(finding.evidence)}</div>"
        )
    return f'<section id="findings"><h2>Findings</h2>{"".join(cards)}</section>'


def _addresses(rec: Recommendation, findings: list[Finding]) -> str:
    links = []
    for target in rec.addresses:
        if isinstance(target, int) and 0 <= target < len(findings):
            kind = findings[target].kind
            links.append(f'<a href="#finding-{target}">{esc(title_of(kind).lower())}</a>')
        else:
            links.append(esc(str(target).replace("_", " ")))
    return ", ".join(links)


def _change(before: Any, after: Any) -> str:
    b, a = as_float(before), as_float(after)
    if b is None or a is None or b == 0 or a != a or b != b:
        return ""
    return f"×{num(a / b)}"


def _presence(state: Any) -> str:
    if not isinstance(state, dict):
        return _value(state)
    if not state.get("present"):
        return '<span class="better">gone</span>'
    return f'<span class="worse">present ({esc(state.get("severity", ""))})</span>'


def verification_block(verified: Verification | None) -> str:
    if verified is None:
        return ""
    if not verified.applied:
        return (
            '<div class="verify"><span class="pill neutral">not tried</span> '
            f"{esc(verified.reason or '')}</div>"
        )
    if verified.resolved is True:
        badge = '<span class="pill ok">verified: resolved</span>'
    elif verified.resolved is False:
        badge = '<span class="pill warning">tried: not resolved</span>'
    else:
        badge = '<span class="pill neutral">tried: no verdict</span>'
    rows = []
    before_figures = verified.before.get("figures", {}) or {}
    after_figures = verified.after.get("figures", {}) or {}
    for name in dict.fromkeys([*before_figures, *after_figures]):
        b, a = before_figures.get(name), after_figures.get(name)
        rows.append(
            f'<tr><td class="mono">{esc(name)}</td><td class="n">{_value(b)}</td>'
            f'<td class="n">{_value(a)}</td><td class="n">{esc(_change(b, a))}</td></tr>'
        )
    for key in dict.fromkeys([*verified.before, *verified.after]):
        if key == "figures" or key in _NEW_KEYS:
            continue
        rows.append(
            f'<tr><td class="mono">{esc(key)}</td>'
            f'<td class="n">{_presence(verified.before.get(key))}</td>'
            f'<td class="n">{_presence(verified.after.get(key))}</td><td></td></tr>'
        )
    table = (
        '<table><tr><th>measure</th><th class="n">before</th><th class="n">after</th>'
        f'<th class="n">change</th></tr>{"".join(rows)}</table>'
        if rows
        else ""
    )
    transform = (
        f' <span class="muted">{esc(verified.transform)}</span>' if verified.transform else ""
    )
    reason = f'<p class="muted">{esc(verified.reason)}</p>' if verified.reason else ""
    return f'<div class="verify">{badge}{transform}{reason}{_new_after(verified)}{table}</div>'


# what a fix brought that was not there before (verify: after.new_errors / new_warnings /
# new_findings) and what an exact rewrite revealed (after.revealed_findings); listed on their
# own, not as before/after rows
_NEW_KEYS = frozenset({"new_errors", "new_warnings", "new_findings", "revealed_findings"})


def _new_after(verified: Verification) -> str:
    found = verified.after.get("new_findings")
    if not isinstance(found, list) or not found:
        # reports from before new_findings existed: the kinds alone
        kinds = [
            (severity, kind)
            for severity, key in (("error", "new_errors"), ("warning", "new_warnings"))
            for kind in verified.after.get(key) or []
        ]
        found = [{"kind": kind, "severity": severity} for severity, kind in kinds]
    revealed = verified.after.get("revealed_findings")
    return _finding_list("New after the fix:", found) + _finding_list(
        "Hidden before by the NaN/Inf, shown by the exact rewrite:",
        revealed if isinstance(revealed, list) else [],
    )


def _finding_list(title: str, found: list[Any]) -> str:
    items = []
    for f in found:
        if not isinstance(f, dict):
            continue
        severity = str(f.get("severity", "warning"))
        axis = f" ({esc(f['axis'])})" if f.get("axis") else ""
        message = f": {esc(f['message'])}" if f.get("message") else ""
        items.append(
            f'<li><span class="pill {esc(severity)}">{esc(severity)}</span> '
            f"{esc(title_of(str(f.get('kind', ''))))}{axis}{message}</li>"
        )
    if not items:
        return ""
    return f'<p class="muted">{esc(title)}</p><ul class="new-after">{"".join(items)}</ul>'


def recommendations_section(recs: list[Recommendation], findings: list[Finding]) -> str:
    if not recs:
        return ""
    cards = []
    for rank, rec in enumerate(recs, start=1):
        params = f'<p class="muted">Parameters: {_value(rec.params)}</p>' if rec.params else ""
        snippet = f"<pre><code>{esc(rec.snippet)}</code></pre>" if rec.snippet else ""
        addresses = _addresses(rec, findings)
        cards.append(
            f'<div class="card rec" id="rec-{rank}"><div class="head">'
            f'<span class="pill neutral">#{rank}</span>'
            f'<span class="fix">{esc(title_of(rec.fix))}</span>'
            + (f'<span class="muted">addresses {addresses}</span>' if addresses else "")
            + f"</div><p>{esc(rec.rationale)}</p>{chips(rec.layers)}{params}{snippet}"
            f"{verification_block(rec.verified)}</div>"
        )
    return f'<section id="recommendations"><h2>Recommendations</h2>{"".join(cards)}</section>'
