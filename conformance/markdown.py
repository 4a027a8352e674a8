"""The Markdown renderer of a report (``<run-id>.md``): header, backends and their
declared deviations, the verdict matrix, every check, and each failure, error and
deviation with its counterexample and replay command."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from .tables import (
    CONVENTIONS,
    INCOMPLETE,
    bound_text,
    comparison,
    num,
    one_line,
    rel_err,
    settings_line,
    status_text,
    summary_text,
    tolerance_text,
)


def declared_deviations(backends: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown: every deviation each backend declared (key, bound, whether a predicate
    selects its examples, reason), whether or not a check needed it."""
    out: list[str] = []
    for b in backends:
        devs = b.get("deviations") or []
        if not devs:
            continue
        out += ["", f"### Deviations declared by {b['name']}", ""]
        out.append(tabulate([[f"`{d['key']}`", bound_text(d.get("bound")),
                              "yes" if d.get("predicate") else "no", one_line(d["reason"], 400)]
                             for d in devs], ["key", "bound", "predicate", "reason"],
                            tablefmt="github"))
    return out


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def render(report: dict[str, Any]) -> str:
    """The report as Markdown (GitHub tables)."""
    env = report["environment"]
    out = [f"# lmspec conformance report {report['report_id']}", ""]
    if report.get("incomplete"):
        out += ["> " + INCOMPLETE, ""]
    out += [f"- spec version: {report['spec_version']} (lmspec {env.get('lmspec')})",
            f"- created: {report['created']}, duration {report['duration_s']} s",
            f"- settings: {settings_line(report)}",
            f"- environment: Python {env.get('python')}, NumPy {env.get('numpy')}, torch "
            f"{env.get('torch')}, Hypothesis {env.get('hypothesis')}; CPU {env.get('cpu')}; "
            f"GPU {env.get('gpu') or 'none'}; {env.get('platform')}",
            "- summary: " + summary_text(report), "", "Conventions:", ""]
    out += [f"- {c}" for c in CONVENTIONS] + ["", "## Backends", ""]
    out.append(tabulate([[b["name"], b["device"], ", ".join(b["dtypes"]), b.get("plugin", ""),
                          b["version"], b["status"]] for b in report["backends"]],
                        ["backend", "device", "dtypes", "plugin", "version", "status"],
                        tablefmt="github"))
    out += declared_deviations(report["backends"])
    out += ["", "## Results (op × backend × dtype)", ""]
    headers, rows = comparison(report["results"])
    out.append(tabulate(rows, headers, tablefmt="github") if rows else "(no results)")
    out += ["", "## Checks", ""]
    out.append(tabulate(
        [[r["op"], r["backend"], r["dtype"], r["check"], status_text(r), r["examples"],
          r.get("unsupported_examples", ""), r.get("shrink_replays", ""),
          num(r["max_abs_err"]), rel_err(r), num(r["worst_ratio"]), tolerance_text(r),
          _md(one_line(r["message"]))] for r in report["results"]],
        ["op", "backend", "dtype", "check", "status", "checked", "unsupported",
         "shrink replays", "max abs err", "max rel err", "worst ratio", "tolerance", "message"],
        tablefmt="github", disable_numparse=True))
    notable = [r for r in report["results"] if r["status"] in ("fail", "error", "deviation")]
    if notable:
        out += ["", "## Failures, errors and deviations", ""]
    for r in notable:
        out += [f"### {r['status']}: {r['backend']} {r['op']} {r['dtype']} {r['check']}", "",
                r["message"], ""]
        if tolerance_text(r):
            out += [f"Tolerance at the worst example: {tolerance_text(r)}; worst ratio "
                    f"{num(r['worst_ratio'])}.", ""]
        if r.get("deviation_reason"):
            out += [f"Documented reason: {r['deviation_reason']}", ""]
        if r.get("counterexample") is not None:
            ce = json.dumps(r["counterexample"], separators=(",", ":"))
            out += ["Counterexample (shrunk):", "", "```json",
                    ce if len(ce) < 4000 else ce[:4000] + " …(truncated; full in the JSON report)",
                    "```", ""]
        if r.get("reproduce"):
            out += ["Replay:", "", "```sh", r["reproduce"], "```", ""]
        if r.get("backend_output"):
            out += ["Backend output:", "", "```text", r["backend_output"], "```", ""]
    policy = next((r["tolerance"]["policy"] for r in report["results"]
                   if r.get("tolerance") and r["tolerance"].get("policy")), "")
    if policy:
        out += ["", "## Tolerance policy", "", f"Per output array: `{policy}`", ""]
    return "\n".join(out) + "\n"
