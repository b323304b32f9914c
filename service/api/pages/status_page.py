"""Pages for a diagnosis without a report: queued and running ones reload themselves until the
report is there; failed shows the error; cancelled says so."""

from __future__ import annotations

from service.api.pages.formatting import esc
from service.api.pages.layout import page
from service.api.pages.view import DiagnosisView, when

REFRESH_S = 3

HEADLINES = {
    "queued": ("Queued", "neutral", "Waiting for a worker. This page reloads every few seconds."),
    "running": (
        "Running",
        "info",
        "A worker is measuring the gradients. This page reloads every few seconds.",
    ),
    "failed": ("Failed", "error", "The diagnosis did not produce a report."),
    "cancelled": ("Cancelled", "neutral", "The diagnosis was cancelled before it finished."),
}


def render_status(view: DiagnosisView) -> str:
    headline, level, text = HEADLINES.get(
        view.status, (view.status, "neutral", "This diagnosis has no report.")
    )
    lines = [
        '<div class="card status">',
        f'<span class="pill {level}">{esc(headline)}</span>',
        f'<div class="big">{esc(view.title)}</div>',
        f'<p class="lead">{esc(text)}</p>',
        f'<p class="muted">diagnosis <span class="mono">{esc(view.id)}</span> · queued '
        f"{esc(when(view.created_at))}"
        + (f" · started {esc(when(view.started_at))}" if view.started_at else "")
        + (f" · finished {esc(when(view.finished_at))}" if view.finished_at else "")
        + f" · attempt {view.attempts} of {view.max_attempts}</p>",
    ]
    if view.status == "running" and view.cancel_requested:
        lines.append('<p class="muted">Cancellation requested: the worker is stopping it.</p>')
    if view.error_code or view.error_message:
        lines.append(
            '<div class="error-box" role="alert"><code>'
            f"{esc(view.error_code or 'error')}</code>: {esc(view.error_message or '')}</div>"
        )
    lines.append("</div>")
    refresh = REFRESH_S if view.status in ("queued", "running") else None
    return page(
        f"{headline}: {view.title} — gradhealth",
        "\n".join(lines),
        where=f"diagnosis {view.id}",
        refresh_s=refresh,
    )
