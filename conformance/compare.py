"""``lmspec compare``: several reports side by side, their differences marked.

The settings and environment of each report, then the verdicts op × dtype with a column
per report and backend. A row of the first table, or a cell of the second, that differs
between the reports is marked ``≠``; ``lmspec compare`` exits 1 when any verdict differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tabulate import tabulate

from .report import cell, grid, label, summary_text

HEADER_FIELDS: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...] = (
    ("lmspec", lambda r: r["environment"].get("lmspec")),
    ("spec version", lambda r: r.get("spec_version")),
    ("profile", lambda r: r["settings"].get("profile")),
    ("seed", lambda r: r["settings"].get("seed")),
    ("examples per check", lambda r: r["settings"].get("max_examples")),
    ("backends", lambda r: ", ".join(b["name"] for b in r.get("backends", []))),
    ("CPU", lambda r: r["environment"].get("cpu")),
    ("GPU", lambda r: r["environment"].get("gpu") or "none"),
    ("CPU features", lambda r: " ".join(r["environment"].get("cpu_flags") or []) or "-"),
    ("BLAS", lambda r: ", ".join(f"{b.get('internal_api')} {b.get('version')} "
                                 f"({b.get('num_threads')} threads)"
                                 for b in r["environment"].get("blas") or []) or "-"),
    ("kernel variables", lambda r: " ".join(f"{k}={v}" for k, v in sorted(
        (r["environment"].get("env") or {}).items())) or "-"),
    ("torch", lambda r: r["environment"].get("torch")),
    ("numpy", lambda r: r["environment"].get("numpy")),
    ("hypothesis", lambda r: r["environment"].get("hypothesis")),
    ("python", lambda r: r["environment"].get("python")),
    ("platform", lambda r: r["environment"].get("platform")),
    ("created", lambda r: r.get("created")),
    ("incomplete", lambda r: "yes" if r.get("incomplete") else "no"),
    ("summary", summary_text),
)
DIFF = "≠"


def compare_header(reports: Sequence[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[list]]:
    """Rows: fields of the reports' settings and environment; a row whose values differ
    starts with ``≠`` (``created`` and ``summary`` are shown, not compared)."""
    rows = []
    for name, get in HEADER_FIELDS:
        vals = [str(get(rep)) for _, rep in reports]
        differ = len(set(vals)) > 1 and name not in ("created", "summary")
        rows.append([DIFF if differ else "", name, *vals])
    return ["", "field"] + [f"[{i + 1}]" for i in range(len(reports))], rows


def compare_results(reports: Sequence[tuple[str, dict[str, Any]]]
                    ) -> tuple[list[str], list[list], int]:
    """Rows: ops; columns: each dtype, then each report, then each of its backends. The
    cells of an (op, dtype) whose verdicts on the checks they share disagree start with
    ``≠``; the number of such (op, dtype) pairs is returned too."""
    grids = [grid(rep["results"]) for _, rep in reports]
    dtypes = list(dict.fromkeys(r["dtype"] for _, rep in reports for r in rep["results"]))
    cols = [(dt, i, b) for dt in dtypes for i, (_, rep) in enumerate(reports)
            for b in dict.fromkeys(r["backend"] for r in rep["results"] if r["dtype"] == dt)]
    ops = list(dict.fromkeys(r["op"] for _, rep in reports for r in rep["results"]))
    rows, differing = [], 0
    for op in ops:
        row: list[str] = [op]
        for dt in dtypes:
            members = [(i, b, grids[i].get((op, b, d), [])) for d, i, b in cols if d == dt]
            verdicts = [{r["check"]: label(r) for r in rs} for _, _, rs in members if rs]
            shared = set.intersection(*(set(v) for v in verdicts)) if verdicts else set()
            differ = len({tuple(sorted((c, v[c]) for c in shared)) for v in verdicts}) > 1
            differing += differ
            row += [(f"{DIFF} " if differ and rs else "") + (cell(rs) if rs else "—")
                    for _, _, rs in members]
        rows.append(row)
    headers = ["op"] + [f"[{i + 1}] {b} {dt}" for dt, i, b in cols]
    return headers, rows, differing


def compare_table(reports: Sequence[tuple[str, dict[str, Any]]], fmt: str = "simple"
                  ) -> tuple[str, int]:
    """``lmspec compare``: the reports' settings and environment side by side, then their
    verdicts, differences marked ``≠``; also the number of (op, dtype) whose verdicts
    differ (the command exits 1 when it is not 0)."""
    legend = [f"[{i + 1}] {name}: {rep['report_id']}" for i, (name, rep) in enumerate(reports)]
    hh, hrows = compare_header(reports)
    rh, rrows, differing = compare_results(reports)
    note = (f"{differing} (op, dtype) with differing verdicts (marked {DIFF})" if differing
            else "the verdicts agree on every (op, dtype) the reports share")
    if fmt == "github":
        legend = [f"- {x}" for x in legend]
    text = ("\n".join(legend) + "\n\n" + tabulate(hrows, hh, tablefmt=fmt) + "\n\n"
            + tabulate(rrows, rh, tablefmt=fmt) + f"\n\n{note}\n")
    return text, differing
