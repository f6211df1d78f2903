"""The status page template (``GET /``, admin key): per-key usage and detector statistics, PoW difficulty,
the detector policy, flagged keys, last queries."""

from __future__ import annotations

import datetime as _dt
from html import escape
from typing import Any

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>misleader gateway</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f0f0f0; }} td.l, th.l {{ text-align: left; }}
.bar {{ background: #dde; width: 160px; height: 10px; }} .bar div {{ background: #46a; height: 10px; }}
.bad {{ color: #b00; font-weight: bold; }}
</style></head><body>
<h1>misleader gateway</h1>
<p>Serving <b>{folder}</b> ({kind}{defense}) &middot; dataset {dataset} &middot; output {output} &middot;
proof-of-work: {pow} &middot; rows answered since start: {rows}</p>
<p>Detector: {detector}</p>
<h2>Keys</h2>
<table><tr><th class="l">name</th><th class="l">id</th><th>used</th><th>reserved</th><th>budget</th>
<th>usage</th><th class="l">rate</th><th>rows scored</th><th>mean score</th><th>flagged rows</th>
<th class="l">state</th></tr>
{keys}</table>
<h2>Last queries</h2>
<table><tr><th>#</th><th class="l">time (UTC)</th><th class="l">key</th><th>rows</th><th>status</th>
<th class="l">reason</th><th>PoW bits</th><th>detector</th><th>flagged</th><th>ms</th>
<th class="l">batch sha256</th></tr>
{queries}</table>
</body></html>
"""


def _fmt(v: Any, spec: str = "") -> str:
    return "" if v is None else escape(format(v, spec))


def _det(st: Any) -> str:
    if st is None or not st.queries:
        return "<td>0</td><td></td><td></td>"
    return (f"<td>{st.queries}</td><td>{st.mean_score:.4g}</td>"
            f"<td>{st.flagged} ({100 * st.flagged_fraction:.1f}%)</td>")


def render_status(*, info: dict[str, Any], keys: list, queries: list[dict[str, Any]], pow_desc: str,
                  rows: int, flagged: set[str], detector_desc: str = "off",
                  detector_stats: dict[str, Any] | None = None) -> str:
    """The HTML page (every value escaped); ``detector_stats``: key id -> ClientStats."""
    detector_stats = detector_stats or {}
    names = {k.id: k.name for k in keys}
    krows = []
    for k in keys:
        frac = 0.0 if not k.budget else min(1.0, k.used / k.budget)
        state = "revoked" if k.revoked else "flagged" if k.id in flagged else "admin" if k.admin else "active"
        cls = ' class="l bad"' if state in ("revoked", "flagged") else ' class="l"'
        krows.append(f'<tr><td class="l">{escape(k.name)}</td><td class="l">{escape(k.id)}</td><td>{k.used}</td>'
                     f'<td>{k.reserved}</td><td>{"unlimited" if k.budget is None else k.budget}</td>'
                     f'<td><div class="bar"><div style="width:{100 * frac:.0f}%"></div></div></td>'
                     f'<td class="l">{_fmt(k.rate) or "-"}</td>{_det(detector_stats.get(k.id))}'
                     f'<td{cls}>{state}</td></tr>')
    qrows = []
    for q in queries:
        t = _dt.datetime.fromtimestamp(q["ts"], _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        qrows.append(f'<tr><td>{q["id"]}</td><td class="l">{t}</td><td class="l">'
                     f'{escape(names.get(q["key_id"], q["key_id"] or "-"))}</td><td>{q["rows_n"]}</td>'
                     f'<td>{q["status"]}</td><td class="l">{_fmt(q["reason"])}</td><td>{_fmt(q["pow_bits"])}</td>'
                     f'<td>{_fmt(q["detector_score"], ".3f")}</td><td>{_fmt(q.get("flagged_rows"))}</td>'
                     f'<td>{_fmt(q["latency_ms"], ".1f")}</td>'
                     f'<td class="l"><code>{_fmt((q["batch_sha256"] or "")[:16])}</code></td></tr>')
    return _PAGE.format(folder=escape(str(info.get("folder", ""))), kind=escape(str(info["kind"])),
                        defense=f", {escape(str(info['defense']))}" if info.get("defense") else "",
                        dataset=escape(str(info["dataset"])), output=escape(info["output"]), pow=escape(pow_desc),
                        rows=rows, detector=escape(detector_desc), keys="\n".join(krows), queries="\n".join(qrows))


__all__ = ["render_status"]
