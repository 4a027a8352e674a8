"""The report as one self-contained HTML page: no network, inline CSS, SVG figures.

The page shows the header (report id, settings, environment, an ``incomplete`` flag),
the op × backend × dtype matrix coloured by verdict and worst ratio, every failure with
its shrunk counterexample and replay command, the checks that were not fully checked,
and for every (op, backend, dtype) one figure of the per-example error/tolerance
distribution (``ratio_distribution`` of each check; log scale, pass line at 1).

The figures are plain SVG written here (polygons, lines and text in points, text kept
as text): a report of several hundred checks draws them in a tenth of a second, where
matplotlib took 3–5 s.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from html import escape
from typing import Any

from . import tables as rp

COLOURS = {"pass": "#cfeccf", "partial": "#f7d79b", "deviation": "#c8d6f5",
           "fail": "#f39a9a", "error": "#c9302c", "unsupported": "#e2e2e2",
           "skipped": "#f3f3f3"}
"""Cell colour of each verdict (a pass is further shaded by its worst ratio)."""
BAR = {"pass": "#3b8f4f", "partial": "#c98a12", "deviation": "#4c6fc4", "fail": "#c62828",
       "error": "#7b1010", "unsupported": "#999999", "skipped": "#999999"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em auto;
max-width:1400px;padding:0 1em;color:#1b1b1b}
h1{font-size:1.45em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
code,pre{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{background:#f6f6f6;padding:.6em .8em;overflow-x:auto;white-space:pre-wrap;
word-break:break-all}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #d4d4d4;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f2f2}
table.matrix td{text-align:center;font-size:12.5px;min-width:6.5em}
table.matrix td a{color:inherit;text-decoration:none;display:block}
table.matrix td.op,table.checks td{text-align:left}
table.checks td,table.checks th{font-size:12.5px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{background:#fff3cd;border:1px solid #e0c46c;padding:.6em .9em;margin:.8em 0}
.legend span{display:inline-block;padding:1px 8px;margin:2px 4px 2px 0;border:1px solid #ccc}
.fig{display:inline-block;margin:4px 14px 10px 0;vertical-align:top}
.fig svg{display:block;height:auto;max-width:100%}
.fig .cap{font-size:12.5px;color:#444}
.fail-box{border-left:4px solid #c62828;padding:.1em .9em;margin:1em 0;background:#fffafa}
.dev-box{border-left:4px solid #4c6fc4;padding:.1em .9em;margin:1em 0;background:#f8faff}
.diff{outline:3px solid #d81b60;outline-offset:-3px;font-weight:600}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:2px 14px}
dl.meta dt{color:#555}dl.meta dd{margin:0}
"""


def _e(x: Any) -> str:
    return escape("" if x is None else str(x))


def _mix(a: str, b: str, t: float) -> str:
    ca = [int(a[i:i + 2], 16) for i in (1, 3, 5)]
    cb = [int(b[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))


def _ratio(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def worst_ratio(results: Sequence[dict[str, Any]]) -> float:
    vals = [_ratio(r.get("worst_ratio")) for r in results
            if ((r.get("tolerance") or {}).get("at_worst") or r["status"] == "fail")]
    vals = [v for v in vals if not math.isnan(v)]
    return max(vals) if vals else math.nan


def cell_colour(results: Sequence[dict[str, Any]]) -> str:
    """The verdict's colour; a pass goes from pale green (ratio ≤ 0.01) to yellow (1)."""
    lab = rp.worst_label(results)
    if lab != "pass":
        return COLOURS.get(lab, "#ffffff")
    w = worst_ratio(results)
    t = 0.0 if not w > 0 else min(1.0, max(0.0, (math.log10(w) + 2) / 2))
    return _mix("#d7f0d7", "#f2ec9b", t)


def anchor(*parts: str) -> str:
    return "x-" + re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(parts))


# -- figures -----------------------------------------------------------------------

_LO, _HI = -7.0, 2.0  # panel x range (log10 ratio): the "below" bin, 1e-6 … 10, "above"
_GAP = 1.4


_EMPTY = {"edges_log10": [x / 2 for x in range(-12, 3)], "counts": [0] * 14, "below": 0,
          "above": 0}


def _plotted(r: dict[str, Any]) -> bool:
    """A check gets a panel when it has a distribution, or failed or deviated (then its
    worst ratio is marked even if no example completed)."""
    if r["status"] in ("unsupported", "skipped"):  # nothing was judged
        return False
    return bool(r.get("ratio_distribution")) or r["status"] in ("fail", "deviation")


def _figure_svg(results: Sequence[dict[str, Any]]) -> str:
    """One figure of small panels, one per check that has a ratio distribution: the
    share of its examples in each bin of log10(error/tolerance), the pass line at 1
    (dashed) and the worst ratio (▼), written as SVG elements (sizes in points)."""
    panels = [r for r in results if _plotted(r)]
    width, n = _HI - _LO, len(panels)
    w, h = 72 * (0.3 + 1.75 * n), 72 * 1.35
    span = n * (width + _GAP) - _GAP + 1.6

    def xy(x: float, y: float) -> str:
        """Data (x: log10 ratio, panel i shifted by i·(width + gap); y: share) to points."""
        return f"{(x + 0.8 - _LO) / span * w:.2f},{(1 - (0.55 * y + 0.24)) * h:.2f}"

    shapes: list[str] = []
    for i, r in enumerate(panels):
        d, x0, lab = r.get("ratio_distribution") or _EMPTY, i * (width + _GAP), rp.label(r)
        n_ex = sum(d["counts"]) + d["below"] + d["above"]
        total = max(1, n_ex)
        edges = d["edges_log10"]
        bins = [(_LO, _LO + 0.5, d["below"], "#9e9e9e")]
        bins += [(edges[j], edges[j + 1], c, "#e57373" if edges[j] >= 0 else BAR["pass"])
                 for j, c in enumerate(d["counts"])]
        bins.append((_HI - 0.5, _HI, d["above"], "#c62828"))
        polys = [([(x0 + a, 0), (x0 + b, 0), (x0 + b, c / total), (x0 + a, c / total)], col)
                 for a, b, c, col in bins if c]
        worst = _ratio(r.get("worst_ratio"))
        if worst > 0:
            wx = x0 + min(_HI - 0.25, max(_LO + 0.25, math.log10(worst)
                                          if worst < math.inf else _HI))
            polys.append(([(wx - 0.3, 1.12), (wx + 0.3, 1.12), (wx, 1.0)],
                          BAR.get(lab, "#555555")))
        shapes += [f'<polygon points="{" ".join(xy(*p) for p in pts)}" fill="{col}"/>'
                   for pts, col in polys]
        shapes += [f'<polyline points="{xy(x0 + _LO, 0)} {xy(x0 + _HI, 0)}" stroke="#888888"/>',
                   f'<polyline points="{xy(x0, 0)} {xy(x0, 1.1)}" stroke="#c62828" '
                   'stroke-dasharray="2.4 1.6"/>']
        title = r["check"] if len(r["check"]) <= 26 else r["check"][:25] + "…"
        mid = x0 + (_LO + _HI) / 2
        texts = [(mid, 1.2, title, "bottom", 7, "#222" if lab == "pass" else BAR[lab]),
                 (mid, -0.22, f"max {rp.num(r.get('worst_ratio'))} · n={n_ex}", "top", 6,
                  "#444")]
        texts += [(x0 + x, -0.03, t, "top", 5.5, "#666")
                  for x, t in ((_LO + 0.25, "<1e-6"), (-3, "1e-3"), (0, "1"), (_HI - 0.25, ">10"))]
        for x, y, t, va, size, col in texts:
            px, py = map(float, xy(x, y).split(","))
            py += 0.8 * size if va == "top" else -0.2 * size  # baseline below/above the anchor
            shapes.append(f'<text x="{px:.2f}" y="{py:.2f}" font-size="{size}" fill="{col}">'
                          f"{escape(t)}</text>")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.1f}pt" height="{h:.1f}pt" '
            f'viewBox="0 0 {w:.2f} {h:.2f}" font-family="sans-serif" text-anchor="middle" '
            f'fill="none" stroke-width="0.8">' + "".join(shapes) + "</svg>")


def figures(report: dict[str, Any]) -> dict[tuple[str, str, str], str]:
    """One SVG per (op, backend, dtype) that has at least one ratio distribution."""
    return {key: _figure_svg(rs) for key, rs in rp.grid(report["results"]).items()
            if any(map(_plotted, rs))}


# -- page parts --------------------------------------------------------------------

def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(c if isinstance(c, Markup) else f"<td>{_e(c)}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Markup(str):
    """A table cell already written as HTML (``<td>…</td>``)."""


def _matrix_cell(rs: Sequence[dict[str, Any]], op: str, b: str, d: str, diff: bool = False,
                 link: bool = True) -> Markup:
    if not rs:
        return Markup("<td>—</td>")
    lab = rp.worst_label(rs)
    w = worst_ratio(rs)
    text = rp.MARK[lab] if lab != "pass" else "pass"
    if lab == "pass" and any(r["check"] == "vjp" and rp.label(r) == "unsupported" for r in rs):
        text += "; no vjp"  # as rp.cell: a pass is never shown as unsupported
    precisions = sorted({p for p in map(rp.precision_note, rs) if p})
    if precisions:  # the working precision a verdict was judged at (CONTRACT §6)
        text += f" ({', '.join(precisions)})"
    sub = f"<br><small>ratio {rp.num(w)}</small>" if not math.isnan(w) and lab not in (
        "unsupported", "skipped") else ""
    tip = "\n".join(f"{r['check']}: {rp.status_text(r)}, worst ratio {rp.num(r['worst_ratio'])}"
                    f", {r.get('examples', 0)} checked" for r in rs)
    colour = cell_colour(rs)
    fg = "#fff" if lab == "error" else "#111"
    inner = f"{_e(text)}{sub}"
    if link:
        inner = f'<a href="#{anchor(op, b, d)}">{inner}</a>'
    cls = ' class="diff"' if diff else ""
    return Markup(f'<td{cls} style="background:{colour};color:{fg}" title="{_e(tip)}">'
                  f"{inner}</td>")


def matrix(report: dict[str, Any]) -> str:
    g = rp.grid(report["results"])
    cols = rp.columns(report["results"])
    ops = list(dict.fromkeys(r["op"] for r in report["results"]))
    rows = [[Markup(f'<td class="op"><a href="#{anchor(op)}">{_e(op)}</a></td>')]
            + [_matrix_cell(rs, op, b, d, link=any(map(_plotted, rs)))
               for rs, b, d in ((g.get((op, b, d), []), b, d) for b, d in cols)] for op in ops]
    return _table(["op"] + [f"{b} {d}" for b, d in cols], rows, "matrix")


def legend() -> str:
    items = [("pass (ratio ≤ 0.01)", _mix("#d7f0d7", "#f2ec9b", 0)),
             ("pass (ratio near 1)", _mix("#d7f0d7", "#f2ec9b", 1))]
    items += [(rp.MARK[k], COLOURS[k]) for k in ("partial", "deviation", "fail", "error",
                                                  "unsupported", "skipped")]
    return '<p class="legend">' + "".join(
        f'<span style="background:{c};color:{"#fff" if c == COLOURS["error"] else "#111"}">'
        f"{_e(t)}</span>" for t, c in items) + "</p>"


def _meta(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    pairs = [("report id", report["report_id"]), ("spec version", report["spec_version"]),
             ("lmspec", env.get("lmspec")), ("created", report["created"]),
             ("duration", f"{report['duration_s']} s"),
             ("settings", f"profile {s.get('profile')}, {s.get('max_examples')} examples per "
                          f"check, seed {s.get('seed')}, checks {s.get('checks', 'all')}"),
             ("summary", rp.summary_text(report)),
             ("CPU", f"{env.get('cpu')} ({env.get('cpu_count')} cores)"),
             ("GPU", env.get("gpu") or "none"),
             ("versions", f"Python {env.get('python')}, NumPy {env.get('numpy')}, torch "
                          f"{env.get('torch')}, Hypothesis {env.get('hypothesis')}"),
             ("platform", env.get("platform"))]
    return '<dl class="meta">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>"
                                         for k, v in pairs) + "</dl>"


def _failure(r: dict[str, Any]) -> str:
    cls = "dev-box" if r["status"] == "deviation" else "fail-box"
    out = [f'<div class="{cls}" id="{anchor("f", r["op"], r["backend"], r["dtype"], r["check"])}">',
           f"<h3>{_e(r['status'])}: {_e(r['backend'])} {_e(r['op'])} {_e(r['dtype'])} "
           f"{_e(r['check'])}</h3>", f"<p>{_e(r['message'])}</p>"]
    if rp.tolerance_text(r):
        out.append(f"<p>Tolerance at the worst example: {_e(rp.tolerance_text(r))}; worst ratio "
                   f"{_e(rp.num(r['worst_ratio']))}.</p>")
    if r.get("deviation_reason"):
        out.append(f"<p>Documented reason: {_e(r['deviation_reason'])}</p>")
    lines = rp.counterexample_lines(r)
    if lines:
        out.append("<p>Counterexample (shrunk):</p><pre>" + _e("\n".join(lines)) + "</pre>")
        full = json.dumps(r["counterexample"], separators=(",", ":"))
        if len(full) > 20000:
            full = full[:20000] + " …(truncated; full in the JSON report)"
        out.append(f"<details><summary>as JSON</summary><pre>{_e(full)}</pre></details>")
    if r.get("reproduce"):
        out.append(f"<p>Replay:</p><pre><code>{_e(r['reproduce'])}</code></pre>")
    if r.get("backend_output"):
        out.append(f"<p>Backend output:</p><pre>{_e(r['backend_output'])}</pre>")
    return "\n".join(out + ["</div>"])


def _checks_rows(results: Sequence[dict[str, Any]]) -> list[list[Any]]:
    def n(x: Any) -> Markup:
        return Markup(f'<td class="num">{_e(x)}</td>')

    return [[r["op"], r["backend"], r["dtype"], r["check"], rp.status_text(r),
             n(r.get("examples", 0)), n(r.get("unsupported_examples", "")),
             n(r.get("shrink_replays", "")), n(rp.num(r["max_abs_err"])), n(rp.rel_err(r)),
             n(rp.num(r["worst_ratio"])), rp.tolerance_text(r), rp.one_line(r["message"], 300)]
            for r in results]


def not_checked(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Partial, unsupported and skipped checks folded by (backend, op, verdict, reason)."""
    groups: dict[tuple[str, str, str, str], dict[str, list[str]]] = {}
    for r in results:
        if rp.label(r) in ("partial", "unsupported", "skipped"):
            key = (r["backend"], r["op"], rp.status_text(r), rp.one_line(r["message"], 300))
            groups.setdefault(key, {}).setdefault(r["dtype"], []).append(r["check"])
    return [[b, op, verdict, "; ".join(f"{d}: {', '.join(c)}" for d, c in by.items()), msg]
            for (b, op, verdict, msg), by in groups.items()]


CHECK_HEADERS = ["op", "backend", "dtype", "check", "status", "checked", "unsupported",
                 "shrink replays", "max abs err", "max rel err", "worst ratio", "tolerance",
                 "message"]


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def render(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page."""
    results = report["results"]
    body = [f"<h1>lmspec conformance report</h1><p><code>{_e(report['report_id'])}</code></p>"]
    if report.get("incomplete"):
        body.append(f'<div class="banner">{_e(rp.INCOMPLETE.replace("**", "").replace("`", ""))}'
                    "</div>")
    body += [_meta(report), "<h2>Backends</h2>",
             _table(["backend", "device", "dtypes", "plugin", "version", "status"],
                    [[b["name"], b["device"], ", ".join(b["dtypes"]), b.get("plugin", ""),
                      b["version"], b["status"]] for b in report["backends"]]),
             "<h2>Results (op × backend × dtype)</h2>", legend(),
             "<p>Each cell is the worst verdict of the op's checks on that backend and dtype, "
             "with the largest worst ratio (error / tolerance; at most 1 passes). Hover for "
             "the checks; click for their error distribution.</p>",
             matrix(report) if results else "<p>(no results)</p>"]
    bad = [r for r in results if r["status"] in ("fail", "error", "deviation")]
    if bad:
        body.append("<h2>Failures, errors and deviations</h2>")
        body += [_failure(r) for r in bad]
    thin = not_checked(results)
    if thin:
        body += ["<h2>Not fully checked</h2><p>Partial passes, unsupported and skipped "
                 "checks (never counted as a plain pass), one row per backend, op, verdict "
                 "and reason.</p>",
                 _table(["backend", "op", "verdict", "checks (dtype: checks)", "reason"], thin,
                        "checks")]
    body += ["<h2>Error / tolerance per example</h2>",
             "<p>One figure per op, backend and dtype; one panel per check: the share of "
             "examples whose worst error/tolerance ratio falls in each bin (log scale from "
             "1e-6 to 10; the grey bar at the left holds ratios below 1e-6, zeros included; "
             "the red bar at the right those over 10). The dashed red line is the pass line "
             "(ratio 1); ▼ marks the check's worst ratio.</p>"]
    figs = figures(report)
    current = None
    for (op, b, d), svg in figs.items():
        if op != current:
            body.append(f'<h3 id="{anchor(op)}">{_e(op)}</h3>')
            current = op
        body.append(f'<div class="fig" id="{anchor(op, b, d)}"><div class="cap">{_e(b)} '
                    f"{_e(d)}</div>{svg}</div>")
    body += ["<h2>All checks</h2>", "<details><summary>"
             f"{len(results)} checks</summary>", _table(CHECK_HEADERS, _checks_rows(results),
                                                         "checks"), "</details>",
             "<h2>Conventions</h2><ul>"
             + "".join(f"<li>{_e(c.replace('`', ''))}</li>" for c in rp.CONVENTIONS) + "</ul>"]
    policy = next((r["tolerance"]["policy"] for r in results
                   if r.get("tolerance") and r["tolerance"].get("policy")), "")
    if policy:
        body.append(f"<h2>Tolerance policy</h2><p>Per output array: <code>{_e(policy)}</code></p>")
    return _page(f"lmspec report {report['report_id'][:19]}", body)


def render_compare(reports: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """``lmspec compare --html``: the header table and the verdict table, differences
    outlined."""
    from .tables import DIFF, compare_header, compare_results

    hh, hrows = compare_header(reports)
    rh, rrows, differing = compare_results(reports)
    body = ["<h1>lmspec report comparison</h1><ul>"
            + "".join(f"<li>[{i + 1}] {_e(name)}: <code>{_e(rep['report_id'])}</code>"
                      + (" <b>(incomplete)</b>" if rep.get("incomplete") else "") + "</li>"
                      for i, (name, rep) in enumerate(reports)) + "</ul>",
            "<h2>Settings and environment</h2>",
            _table(hh[1:], [[Markup(f'<td{" class=diff" if row[0] else ""}>{_e(v)}</td>')
                             for v in row[1:]] for row in hrows]),
            "<h2>Verdicts</h2>",
            f"<p>{differing} (op, dtype) with differing verdicts (outlined).</p>" if differing
            else "<p>The verdicts agree on every (op, dtype) the reports share.</p>", legend()]
    grids = [rp.grid(rep["results"]) for _, rep in reports]
    cols = [h.split(" ", 2) for h in rh[1:]]  # "[i] backend dtype"
    rows = []
    for row in rrows:
        op, out = row[0], [Markup(f'<td class="op">{_e(row[0])}</td>')]
        for (idx, b, d), text in zip(cols, row[1:]):
            rs = grids[int(idx.strip("[]")) - 1].get((op, b, d), [])
            out.append(_matrix_cell(rs, op, b, d, diff=text.startswith(DIFF), link=False))
        rows.append(out)
    body.append(_table(rh, rows, "matrix"))
    return _page("lmspec report comparison", body)
