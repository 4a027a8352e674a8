"""The record of a run as people read it: verdict words, cells, tables, numbers.

Every renderer (:mod:`~lmspec.conformance.markdown`, :mod:`~lmspec.conformance.html`,
:mod:`~lmspec.conformance.terminal`, :mod:`~lmspec.conformance.compare`, the scoreboard)
reads a report's records through these functions and none through another renderer:
a verdict is worded, summarised and compared in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lmspec

MARK = {"pass": "pass", "fail": "FAIL", "error": "ERROR", "deviation": "deviation",
        "partial": "partial pass", "unsupported": "unsupported", "skipped": "skipped"}


SEVERITY = ("error", "fail", "deviation", "partial", "unsupported", "skipped", "pass")
"""Worst first. ``partial`` is a pass where fewer than ``harness.MIN_CHECKED_FRACTION`` of
the drawn examples were checked; it is never shown as a plain pass."""


CELL_ORDER = ("error", "fail", "deviation", "partial", "pass", "unsupported", "skipped")
"""The verdicts of a matrix cell (one op × backend × dtype), worst first: as
:data:`SEVERITY`, except that a check that passed outranks one the backend declined, so an
op whose checks pass and whose gradient the backend does not provide reads
``pass; no vjp``, never ``unsupported``. Every table of verdicts uses it: the terminal's,
the Markdown and HTML reports' and the scoreboard's."""


CONVENTIONS = [
    "Numbers are rounded to 3 significant digits; non-finite numbers are written `nan`, "
    "`inf`, `-inf` (strings in the JSON).",
    "`worst ratio` is the largest error divided by its tolerance over all examples of a "
    "check (at most 1 passes); `tolerance` is the tolerance at that worst example "
    "(`k` the reduction length, then the output it belongs to).",
    "`checked` counts the examples the backend answered and the harness judged; "
    "`unsupported` the examples the backend declined (`NotImplementedError`); `shrink "
    "replays` the re-runs Hypothesis made while shrinking a failure (not counted as checked).",
    "A `partial pass` checked fewer than half of the examples drawn; a check with none "
    "checked is `unsupported`, never `pass`.",
    "`max rel err` is `—` where the relative error is undefined (a reference element is 0 or "
    "non-finite while the error is not); the verdict is the worst ratio.",
]


def bound_text(bound: Any) -> str:
    """A deviation's bound for people: ``none``, ``4× tolerance``, ``working precision
    float16``."""
    if bound is None:
        return "none (predicate only)"
    if isinstance(bound, str):
        return f"working precision {bound}"
    return f"{float(bound):g}× tolerance"


def label(r: dict[str, Any]) -> str:
    """A result's verdict for people: its status, or ``partial`` for a partial pass."""
    return "partial" if r["status"] == "pass" and r.get("partial") else r["status"]


def precision_note(r: dict[str, Any]) -> str:
    """The working precision a verdict was judged at where it is not the dtype's own
    (CONTRACT §6): a declared engine mode (``at tf32``) or the precision bound of the
    deviation that excused it (``at float16``); ``""`` otherwise."""
    dev = r.get("deviation") or {}
    bounds = [p.get("bound") for p in dev.get("parts", [dev])]
    precisions = sorted({b for b in bounds if isinstance(b, str)})
    if r["status"] == "deviation" and precisions:
        return "at " + " or ".join(precisions)
    return f"at {r['precision']}" if r.get("precision") else ""


def status_text(r: dict[str, Any]) -> str:
    """The verdict with its counts where it needs them (``partial pass (3 of 10 checked)``)
    and the working precision it was judged at, where declared (``pass [at tf32]``)."""
    lab = label(r)
    note = precision_note(r)
    suffix = f" [{note}]" if note else ""
    if lab == "partial":
        drawn = r.get("examples", 0) + r.get("unsupported_examples", 0)
        return f"partial pass ({r.get('examples', 0)} of {drawn} checked){suffix}"
    return (MARK[lab] if lab != "pass" else "pass") + suffix


def lesser_text(lab: str, checks: Sequence[str]) -> str:
    """A verdict of a cell with its checks (``FAIL (vjp)``); an unsupported gradient
    alone is ``no vjp``."""
    checks = list(dict.fromkeys(checks))
    if lab == "unsupported" and checks == ["vjp"]:
        return "no vjp"
    return f"{MARK[lab]} ({', '.join(checks)})"


def cell(results: Sequence[dict[str, Any]]) -> str:
    """One op × backend × dtype cell: ``pass`` only when every check passed outright;
    otherwise ``pass`` first where the worst verdict (:data:`CELL_ORDER`) is a pass, then
    each verdict other than pass, worst first, with its checks (omitted when every check
    of the cell has it): ``pass; no vjp``, ``FAIL (vjp); deviation (forward)``."""
    if not results:
        return ""
    groups: dict[str, list[str]] = {}
    for r in results:
        groups.setdefault(label(r), []).append(r["check"])
    notes = sorted({n for n in map(precision_note, results) if n})
    suffix = f" [{', '.join(notes)}]" if notes else ""
    if len(groups) == 1:
        return MARK[next(iter(groups))] + suffix
    head = ["pass"] if worst_label(results) == "pass" else []
    return "; ".join(head + [lesser_text(lab, groups[lab]) for lab in CELL_ORDER
                             if lab in groups and lab != "pass"]) + suffix


def worst_label(results: Sequence[dict[str, Any]]) -> str:
    """The verdict a cell is coloured and headed by (:data:`CELL_ORDER`)."""
    return min((label(r) for r in results), key=CELL_ORDER.index) if results else ""


def columns(results: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r["backend"], r["dtype"]) for r in results))


def grid(results: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Results grouped by (op, backend, dtype), in report order."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault((r["op"], r["backend"], r["dtype"]), []).append(r)
    return out


def comparison(results: Sequence[dict[str, Any]], label: str = "") -> tuple[list[str], list[list]]:
    """Rows: ops; columns: backend/dtype (prefixed by ``label`` when comparing reports)."""
    cols, g = columns(results), grid(results)
    ops = list(dict.fromkeys(r["op"] for r in results))
    headers = ["op"] + [f"{label}{b} {d}" for b, d in cols]
    rows = [[op] + [cell(g.get((op, b, d), [])) for b, d in cols] for op in ops]
    return headers, rows


def num(x: Any) -> str:
    """3 significant digits; non-finite values (strings in the JSON) as they are."""
    if isinstance(x, bool) or x is None:
        return "" if x is None else str(x)
    return f"{x:.3g}" if isinstance(x, (int, float)) else str(x)


def rel_err(r: dict[str, Any]) -> str:
    x = r.get("max_rel_err")
    return "—" if isinstance(x, str) or (isinstance(x, float) and not math.isfinite(x)) else num(x)


def tolerance_text(r: dict[str, Any]) -> str:
    """The tolerance at the worst example: ``1.2e-05 (k=2, grad x)``."""
    at = ((r.get("tolerance") or {}).get("at_worst")) or {}
    if not at:
        return ""
    where = ", ".join(x for x in (f"k={at['k']}" if "k" in at else "", str(at.get("output", "")))
                      if x)
    return f"{num(at.get('value'))} ({where})" if where else num(at.get("value"))


def one_line(text: str, limit: int = 160) -> str:
    t = " ".join(str(text or "").split())
    return t if len(t) <= limit else t[:limit - 1] + "…"


def settings_line(report: dict[str, Any]) -> str:
    s = report["settings"]
    return (f"profile `{s.get('profile')}`, {s.get('max_examples')} examples per check, "
            f"seed {s.get('seed')}")


def summary_text(report: dict[str, Any]) -> str:
    partial = sum(1 for r in report["results"] if label(r) == "partial")
    return ", ".join(f"{v} {k}" + (f" ({partial} partial)" if k == "pass" and partial else "")
                     for k, v in report["summary"].items())


INCOMPLETE = ("**Incomplete report**: the run was stopped before every check finished; "
              "the checks it did not run are `skipped` (message `interrupted`).")


def _flat(x: Any) -> list[Any]:
    if isinstance(x, list):
        return [v for a in x for v in _flat(a)]
    return [x]


def _value(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def compact(x: Any, limit: int = 20) -> str:
    """A JSON value of a report (a counterexample's part) on one line: an array as
    ``float32[2, 3] [0.5, -1, …]`` with at most ``limit`` values (``… (N values)`` after)."""
    if isinstance(x, dict) and "array" in x and "shape" in x:
        flat = _flat(x["array"])
        vals = ", ".join(_value(v) for v in flat[:limit])
        more = f", … ({len(flat)} values)" if len(flat) > limit else ""
        return f"{x.get('dtype')}{list(x['shape'])} [{vals}{more}]"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {compact(v, limit)}" for k, v in x.items()) + "}"
    if isinstance(x, list):
        return "(" + ", ".join(compact(v, limit) for v in x) + ")"
    return _value(x)


def counterexample_lines(r: dict[str, Any], limit: int = 20) -> list[str]:
    """A result's shrunk counterexample, one argument per line (``name = value``)."""
    ce = r.get("counterexample")
    if not isinstance(ce, dict):
        return []
    op = lmspec.OPS.get(r["op"])
    params = op.params if op is not None else ()
    out = []
    inp = ce.get("input")
    if isinstance(inp, dict) and "args" in inp:
        for i, a in enumerate(inp["args"]):
            out.append(f"{params[i] if i < len(params) else f'args[{i}]'} = {compact(a, limit)}")
        out += [f"{k} = {compact(v, limit)}" for k, v in (inp.get("kwargs") or {}).items()]
    elif inp is not None:
        out.append(f"input = {compact(inp, limit)}")
    if ce.get("cotangent") is not None:
        out.append(f"cotangent = {compact(ce['cotangent'], limit)}")
    return out


# -- several reports side by side (lmspec compare, the HTML comparison) -------------

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
