"""GET /v1/models/{id}/history: a model name's succeeded diagnoses over time, each compared with
the one before it.

Every entry is compared with the next older entry of the same list: same name (any version),
same `batch_id` filter when one is given (pass it for like-for-like comparisons: another batch
gives other norms). `since` and `until` only choose which entries are shown, never what they
are compared with, and the oldest entry of a page is compared with the first of the next page:
an entry's changes are the same in every window and on every page. Only the very first
diagnosis of the list has `changes: null`.

A layer is flagged when a gradient norm (of its parameters or of its output) changed by at
least `LAYER_CHANGE_FACTOR` either way between the two diagnoses, or turned non-finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from service.api.operations import get_model
from service.api.schemas import (
    Figure,
    FindingBrief,
    FindingCounts,
    HistoryEntry,
    ModelHistory,
    SeverityChange,
)
from service.db.repositories.diagnoses import Cursor
from service.db.repositories.history import (
    HistoryRow,
    ReportDigest,
    history_rows,
    report_digests,
)
from service.errors import BadInputError

# ×10 or ÷10: an order of magnitude between two runs of one model name is beyond run-to-run
# noise on one batch and is what turns a healthy network into a vanishing or exploding one.
LAYER_CHANGE_FACTOR = 10.0
SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}
COUNTED_SEVERITIES = {"error": "errors", "warning": "warnings", "info": "info"}
NO_DIGEST = ReportDigest(verdict=None, layers=[], findings=[])  # a row deleted in between


def parse_timestamp(value: str | None, parameter: str) -> datetime | None:
    """An ISO 8601 query parameter as an aware UTC datetime (no offset: UTC); 422 naming it."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        hint = " (a '+' in a URL reads as a space: write it %2B, or use Z)" if " " in value else ""
        raise BadInputError(
            f"{parameter}: {value!r} is not an ISO 8601 timestamp{hint}; "
            "pass e.g. 2026-11-26T15:40:00Z"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


# What `GET /v1/models/{id}/history?layers=` accepts (model_history's docstring).
LAYER_VIEWS = ("all", "flagged", "none")


def parse_layer_view(value: str) -> str:
    if value not in LAYER_VIEWS:
        raise BadInputError(f"layers must be one of {', '.join(LAYER_VIEWS)}, not {value!r}")
    return value


def model_history(
    session: Session,
    tenant_id: str,
    model_id: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    batch_id: str | None = None,
    after: Cursor | None = None,
    limit: int = 50,
    layers: str = "all",
) -> ModelHistory:
    """One page of the history of `model_id`'s name (404 for another tenant's model).

    `layers`: which per-layer parts each entry carries (LAYER_VIEWS): `all`, `flagged` (the
    layers flagged or added since the older entry, in `layers` and in `changes.layers`), `none`
    (no per-layer figures; `changes` still names the flagged, added and removed layers)."""
    parse_layer_view(layers)
    if since is not None and until is not None and since >= until:
        raise BadInputError(
            f"since ({since.isoformat()}) must be earlier than until ({until.isoformat()})"
        )
    model = get_model(session, tenant_id, model_id)
    # One row past the page: it says whether a next page exists and is the baseline of the
    # page's oldest entry. `since` is applied here rather than in SQL so that the row just
    # before the window still serves as that baseline (rows come newest first, so the rows
    # inside the window are a prefix).
    rows = history_rows(
        session, tenant_id, model.name, batch_id=batch_id, until=until, after=after, limit=limit + 1
    )
    shown = [row for row in rows if since is None or row.finished_at >= since]
    page = shown[:limit]
    compared = rows[: len(page) + 1]
    digests = report_digests(session, [row.diagnosis_id for row in compared])
    entries = []
    for index, row in enumerate(page):
        older = compared[index + 1] if index + 1 < len(compared) else None
        entries.append(history_entry(row, digests, older, layers))
    return ModelHistory(
        model_id=model.id,
        name=model.name,
        change_factor=LAYER_CHANGE_FACTOR,
        items=entries,
        next_cursor=page[-1].cursor.encode() if len(shown) > limit else None,
    )


def history_entry(
    row: HistoryRow,
    digests: dict[str, ReportDigest],
    older: HistoryRow | None,
    layer_view: str = "all",
) -> HistoryEntry:
    digest = digests.get(row.diagnosis_id, NO_DIGEST)
    findings = [finding_brief(f) for f in digest.findings]
    layers = [layer_figures(layer) for layer in digest.layers]
    changes = None
    if older is not None:
        before = digests.get(older.diagnosis_id, NO_DIGEST)
        changes = compare(
            older,
            before=([finding_brief(f) for f in before.findings], before.layers),
            after=(findings, digest.layers),
        )
    if layer_view != "all":
        moved = set() if changes is None else {*changes["flagged_layers"], *changes["layers_added"]}
        keep = (lambda name: name in moved) if layer_view == "flagged" else (lambda name: False)
        layers = [layer for layer in layers if keep(layer["name"])]
        if changes is not None:
            changes["layers"] = [change for change in changes["layers"] if keep(change["name"])]
    # Per-layer parts are plain dicts validated in one pass with the entry: a page can hold
    # tens of thousands of them, and a model constructor call per layer costs twice as much.
    return HistoryEntry.model_validate(
        {
            "diagnosis_id": row.diagnosis_id,
            "model_id": row.model_id,
            "model_version": row.model_version,
            "batch_id": row.batch_id,
            "created_at": row.created_at,
            "finished_at": row.finished_at,
            "verdict": digest.verdict,
            "counts": count_findings(findings),
            "findings": findings,
            "layers": layers,
            "changes": changes,
        }
    )


def finding_brief(finding: dict[str, Any]) -> FindingBrief:
    return FindingBrief(
        kind=str(finding.get("kind")),
        severity=str(finding.get("severity")),
        layers=[str(name) for name in finding.get("layers") or []],
    )


def count_findings(findings: Iterable[FindingBrief]) -> FindingCounts:
    counts = dict.fromkeys(COUNTED_SEVERITIES.values(), 0)
    for finding in findings:
        key = COUNTED_SEVERITIES.get(finding.severity)
        if key is not None:
            counts[key] += 1
    return FindingCounts(**counts)


def layer_figures(layer: dict[str, Any]) -> dict[str, Any]:
    """A report layer → the fields of `LayerFigures`."""
    stats = layer.get("activation_stats") or {}
    return {
        "name": str(layer.get("name")),
        "op": layer.get("op"),
        "grad_norm": as_figure(as_float(layer.get("grad_norm"))),
        "activation_grad_norm": as_figure(as_float(layer.get("activation_grad_norm"))),
        "dead_fraction": as_figure(as_float(stats.get("dead_fraction"))),
        "saturated_fraction": as_figure(as_float(stats.get("saturated_fraction"))),
    }


def compare(
    older: HistoryRow,
    *,
    before: tuple[list[FindingBrief], list[dict[str, Any]]],
    after: tuple[list[FindingBrief], list[dict[str, Any]]],
) -> dict[str, Any]:
    """The fields of `HistoryChanges`: what changed from the `older` diagnosis (`before`: its
    findings and report layers) to this one (`after`)."""
    worst_before, worst_after = worst_by_kind(before[0]), worst_by_kind(after[0])
    layers_before = {str(layer.get("name")): layer for layer in before[1]}
    layers_after = {str(layer.get("name")): layer for layer in after[1]}
    common = [
        layer_change(name, layers_before[name], layer)
        for name, layer in layers_after.items()
        if name in layers_before
    ]
    return {
        "compared_with": older.diagnosis_id,
        "compared_with_version": older.model_version,
        "findings_appeared": [kind for kind in worst_after if kind not in worst_before],
        "findings_resolved": [kind for kind in worst_before if kind not in worst_after],
        "severity_changed": [
            SeverityChange(kind=kind, before=worst_before[kind], after=severity)
            for kind, severity in worst_after.items()
            if kind in worst_before and worst_before[kind] != severity
        ],
        "layers_added": [name for name in layers_after if name not in layers_before],
        "layers_removed": [name for name in layers_before if name not in layers_after],
        "flagged_layers": [change["name"] for change in common if change["flagged"]],
        "layers": common,
    }


def worst_by_kind(findings: Iterable[FindingBrief]) -> dict[str, str]:
    """kind → its worst severity, in the order the report lists the kinds."""
    worst: dict[str, str] = {}
    for finding in findings:
        current = worst.get(finding.kind)
        if current is None or rank(finding.severity) > rank(current):
            worst[finding.kind] = finding.severity
    return worst


def rank(severity: str) -> int:
    return SEVERITY_RANK.get(severity, -1)


def layer_change(name: str, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Two report layers of one name → the fields of `LayerChange`."""
    grad = norm_ratio(before.get("grad_norm"), after.get("grad_norm"))
    activation = norm_ratio(before.get("activation_grad_norm"), after.get("activation_grad_norm"))
    return {
        "name": name,
        "grad_norm_ratio": as_figure(grad),
        "activation_grad_norm_ratio": as_figure(activation),
        "flagged": is_large_change(grad) or is_large_change(activation),
    }


def norm_ratio(before: Any, after: Any) -> float | None:
    """after / before. None where there is nothing to compare: a figure missing on one side,
    zero on both, non-finite on both. Zero before and not after is an infinite growth; a
    non-finite value on one side gives an infinite, zero or NaN ratio (all flagged)."""
    old, new = as_float(before), as_float(after)
    if old is None or new is None:
        return None
    if not math.isfinite(old) and not math.isfinite(new):
        return None
    if old == 0.0:
        if new == 0.0:
            return None
        return math.nan if math.isnan(new) else math.inf
    return new / old


def is_large_change(ratio: float | None) -> bool:
    if ratio is None:
        return False
    if math.isnan(ratio):
        return True
    return ratio >= LAYER_CHANGE_FACTOR or ratio <= 1.0 / LAYER_CHANGE_FACTOR


def as_float(value: Any) -> float | None:
    """A report number: a float, or the strings "inf" / "-inf" / "nan" the report writes for
    non-finite values (CONTRACT §3); anything else is no figure."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    return None


def as_figure(value: float | None) -> Figure:
    """JSON cannot hold inf/NaN: write them as the report does."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"
