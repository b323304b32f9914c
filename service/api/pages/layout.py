"""The page skeleton: inline CSS (no network assets), a header, and the security headers that
keep any markup that slipped through inert (no script may run on these pages at all)."""

from __future__ import annotations

from service.api.pages.formatting import esc

# No script, no external fetch: inline styles and data: images only.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def page_headers(status: str) -> dict[str, str]:
    """A finished diagnosis never changes; a queued/running one's page must not be cached."""
    cache = "private, max-age=60" if status in ("succeeded", "failed", "cancelled") else "no-store"
    return {**SECURITY_HEADERS, "Cache-Control": cache}


CSS = """
:root { --ink:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#f6f7f9; --card:#fff;
  --blue:#2563eb; --ok:#059669; --warn:#d97706; --err:#dc2626; --info:#0891b2; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 64px; }
header.top { background:#0f172a; color:#e5e7eb; }
header.top .inner { max-width:1120px; margin:0 auto; padding:14px 28px; display:flex;
  gap:16px; align-items:baseline; flex-wrap:wrap; }
header.top .brand { font-weight:700; letter-spacing:.02em; color:#fff; }
header.top .where { color:#94a3b8; font-size:13px; overflow-wrap:anywhere; }
h1 { font-size:24px; margin:0 0 4px; overflow-wrap:anywhere; }
h2 { font-size:18px; margin:36px 0 12px; padding-bottom:6px; border-bottom:1px solid var(--line); }
h3 { font-size:15px; margin:0 0 6px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:16px 18px;
  margin:12px 0; box-shadow:0 1px 2px rgba(0,0,0,.03); }
.summary { display:flex; gap:20px; align-items:flex-start; }
.summary .text { flex:1; min-width:0; }
.verdict { display:inline-block; border-radius:8px; padding:10px 16px; font-weight:700;
  font-size:18px; color:#fff; white-space:nowrap; }
.verdict.healthy { background:var(--ok); } .verdict.at_risk { background:var(--warn); }
.verdict.unhealthy { background:var(--err); }
.lead { font-size:15px; margin:6px 0 0; }
.muted { color:var(--muted); }
.facts { display:flex; flex-wrap:wrap; gap:8px; margin-top:12px; }
.fact { background:#f3f4f6; border-radius:6px; padding:3px 9px; font-size:13px; }
.fact b { font-weight:600; }
.pill { display:inline-block; border-radius:999px; padding:1px 9px; font-size:12px;
  font-weight:600; color:#fff; text-transform:uppercase; letter-spacing:.03em; }
.pill.error { background:var(--err); } .pill.warning { background:var(--warn); }
.pill.info { background:var(--info); } .pill.ok { background:var(--ok); }
.pill.neutral { background:#6b7280; }
.finding { border-left:4px solid var(--line); }
.finding.error { border-left-color:var(--err); } .finding.warning { border-left-color:var(--warn); }
.finding.info { border-left-color:var(--info); }
.finding .head, .rec .head { display:flex; gap:10px; align-items:center; flex-wrap:wrap; }
.finding .kind, .rec .fix { font-weight:700; font-size:15px; }
.chips { display:flex; flex-wrap:wrap; gap:4px; margin:8px 0; }
.chip { font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12px;
  background:#eef2ff; color:#3730a3; border-radius:4px; padding:1px 6px; overflow-wrap:anywhere; }
table { border-collapse:collapse; width:100%; font-size:13px; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line);
  vertical-align:top; }
th { font-weight:600; color:#374151; background:#f9fafb; }
td.n, th.n { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.code, .mono { font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size:12px; overflow-wrap:anywhere; }
table.kv { width:auto; min-width:50%; } table.kv th { width:220px; background:none; }
tr.bad td { background:#fef2f2; }
pre { background:#0f172a; color:#e2e8f0; padding:12px 14px; border-radius:8px; overflow:auto;
  font-size:12.5px; line-height:1.45; margin:10px 0; }
.verify { margin-top:10px; padding:10px 12px; background:#f9fafb; border-radius:8px; }
.verify table { margin-top:6px; }
.better { color:var(--ok); font-weight:600; } .worse { color:var(--err); font-weight:600; }
.chart-card svg { width:100%; height:auto; display:block; }
.chart-card .caption { margin:4px 0 0; color:var(--muted); font-size:13px; }
svg.chart { font:11px -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
svg .plot { fill:#fcfcfd; stroke:#d1d5db; }
svg .grid { stroke:#eceef1; }
svg .tick { fill:#4b5563; } svg .axis-title { fill:#374151; font-weight:600; }
svg .series { fill:none; stroke:var(--blue); stroke-width:2; }
svg .pt circle { fill:var(--blue); stroke:#fff; stroke-width:1.5; }
svg .pt.hot circle { fill:var(--err); }
svg .pt.missing circle { fill:#fff; stroke:#9ca3af; }
svg .pt.zero path { fill:var(--err); }
svg .pt.nonfinite path { stroke:var(--err); stroke-width:2.5; }
svg .threshold { stroke-width:1.5; stroke-dasharray:6 4; }
svg .threshold.error { stroke:var(--err); } svg .threshold.warning { stroke:var(--warn); }
svg .threshold-label { font-size:11px; } svg .threshold-label.error { fill:var(--err); }
svg .threshold-label.warning { fill:var(--warn); }
svg .bar.ok rect { fill:#60a5fa; } svg .bar.warning rect { fill:var(--warn); }
svg .bar.error rect { fill:var(--err); }
dl.evidence { display:grid; grid-template-columns:repeat(auto-fill, minmax(240px, 1fr));
  gap:6px 18px; margin:10px 0 0; padding:10px 12px; background:#f9fafb; border-radius:8px; }
dl.evidence div { min-width:0; } dl.evidence dt { font-size:11px; color:var(--muted);
  text-transform:uppercase; letter-spacing:.04em; }
dl.evidence dd { margin:0; font-variant-numeric:tabular-nums; overflow-wrap:anywhere; }
dl.evidence div.wide { grid-column:1 / -1; }
table.origin { width:auto; margin-top:6px; } table.origin td { text-align:right; }
details > summary { cursor:pointer; color:var(--blue); margin:6px 0; }
.status { text-align:center; padding:48px 24px; }
.status .big { font-size:22px; font-weight:700; margin:12px 0 6px; }
.error-box { text-align:left; background:#fef2f2; border:1px solid #fecaca; border-radius:8px;
  padding:12px 14px; margin:16px auto 0; max-width:760px; }
.error-box code { font-weight:700; }
footer { margin-top:40px; color:var(--muted); font-size:12px; }
"""


def page(title: str, body: str, *, where: str = "", refresh_s: int | None = None) -> str:
    """A whole document; `refresh_s` reloads it (the queued/running pages)."""
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'{refresh}<meta name="referrer" content="no-referrer">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n"
        '<body><header class="top"><div class="inner"><span class="brand">gradhealth</span>'
        f'<span class="where">{esc(where)}</span></div></header>\n'
        f"<main>{body}</main></body></html>\n"
    )
