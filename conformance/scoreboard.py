"""The cross-engine scoreboard: one page (``reports/README.md``) over the committed reports.

``python -m lmspec.conformance.scoreboard [REPORT.json ...] [-o reports/README.md]`` reads
the given reports (default: the ones listed in ``reports/CITED``, never whatever else lies
in the folder), keeps the complete ones (a report
marked ``incomplete`` or run as one shard of a split run is left out; ``lmspec merge``
makes a complete report of the shards) and, where several cover the same backend and
dtype, the newest by ``created``. The page has the reports used, then the
op × backend × dtype table: each cell is the worst verdict of the op's checks, with the
largest ``worst_ratio`` of the checks that were judged, and footnotes that give each
deviation's documented reason and each failure's or error's message; then every failed
or errored cell again under *Open findings*, and a count per backend.

The order of verdicts in a cell, worst first, is :data:`ORDER`. It differs from
:data:`lmspec.conformance.report.SEVERITY` in one place: a check that passed outranks one
the backend declined, so an op whose forward passes and whose gradient the backend does
not provide reads ``pass; no vjp`` rather than ``unsupported``
(:data:`lmspec.conformance.report.CELL_ORDER`, shared by every table of verdicts).
The page has no generation time: the same reports give the same bytes.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tabulate import tabulate

import lmspec
from lmspec._precision import DTYPES

from . import report as rp
from .tables import CELL_ORDER, MARK, columns, label, lesser_text, num, one_line, precision_note

ORDER = CELL_ORDER
"""Verdicts of a scoreboard cell, worst first (see the module docstring)."""
JUDGED = ("pass", "fail", "deviation")
"""Verdicts whose ``worst_ratio`` measures something (an error, unsupported or skipped
check compared nothing, so its ratio is left out of the cell's maximum)."""
MESSAGE_CHARS = 200
ENGINE_KEYS = ("torch", "jax", "jaxlib", "onnxruntime", "onnx")
"""Keys of a backend's ``info`` that name the engine's version."""
DEFAULT_OUTPUT = "reports/README.md"
CITED = "reports/CITED"
"""The list of the reports the scoreboard cites: one path per line, relative to the list's
folder; ``#`` starts a comment."""


def cited(path: str | Path = CITED) -> list[str]:
    """The report paths listed in ``path`` (as paths from the current directory)."""
    path = Path(path)
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [str(path.parent / n) for n in names if n]
COMMAND = "python -m lmspec.conformance.scoreboard -o reports/README.md"

Entry = tuple[str, dict[str, Any]]
Column = tuple[str, str]


# -- which reports -------------------------------------------------------------------

def excluded(rep: dict[str, Any]) -> str:
    """Why a report cannot stand on the scoreboard (``""`` when it can)."""
    if rep.get("incomplete"):
        return "incomplete (the run was stopped before every check finished)"
    shard = (rep.get("settings") or {}).get("shard")
    if shard:
        return f"shard {shard} of a split run (`lmspec merge` the shards into one report)"
    return ""


def _created(rep: dict[str, Any]) -> datetime:
    try:
        t = datetime.fromisoformat(str(rep.get("created", "")))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _entries(reports: Iterable[dict[str, Any] | Entry]) -> list[Entry]:
    out = []
    for x in reports:
        if isinstance(x, tuple):
            out.append((str(x[0]), x[1]))
        else:
            out.append((f"{rp.run_id(x)}.json", x))
    return out


def select(reports: Iterable[dict[str, Any] | Entry]
           ) -> tuple[list[tuple[str, dict[str, Any], list[Column]]], list[tuple[str, str]]]:
    """``(used, left_out)``: each used report with the (backend, dtype) columns it
    supplies, newest first; each report left out with the reason. A column comes from the
    newest complete report that has results for it (ties: the later file name)."""
    used: list[tuple[str, dict[str, Any], list[Column]]] = []
    left_out: list[tuple[str, str]] = []
    complete = []
    for name, rep in _entries(reports):
        why = excluded(rep)
        if why:
            left_out.append((name, why))
        else:
            complete.append((name, rep))
    complete.sort(key=lambda e: (_created(e[1]), e[0]), reverse=True)
    taken: set[Column] = set()
    for name, rep in complete:
        cols = [c for c in columns(rep["results"]) if c not in taken]
        if cols:
            taken.update(cols)
            used.append((name, rep, cols))
        else:
            left_out.append((name, "superseded: newer reports cover all its backends and "
                                  "dtypes"))
    return used, left_out


# -- cells ---------------------------------------------------------------------------

def worst(results: Sequence[dict[str, Any]]) -> str:
    """The worst verdict of a cell's checks by :data:`ORDER` (a partial pass is ``partial``)."""
    return min((label(r) for r in results), key=ORDER.index)


def _ratio(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        return float(x)  # "nan", "inf" are strings in the JSON
    except (TypeError, ValueError):
        return None


def max_ratio(results: Sequence[dict[str, Any]]) -> float | None:
    """The largest ``worst_ratio`` of the judged checks; NaN when any of them is NaN."""
    vals = [v for r in results if r["status"] in JUDGED
            if (v := _ratio(r.get("worst_ratio"))) is not None]
    if not vals:
        return None
    return math.nan if any(math.isnan(v) for v in vals) else max(vals)


def _ratio_text(x: float | None) -> str:
    if x is None:
        return ""
    return str(x) if not math.isfinite(x) else num(x)


class Footnotes:
    """Numbered notes, one per distinct (verdict, backend, text), in order of first use."""

    def __init__(self) -> None:
        self.notes: dict[tuple[str, str, str], int] = {}

    def ref(self, r: dict[str, Any]) -> int | None:
        if r["status"] == "deviation":
            text = one_line(r.get("deviation_reason") or r.get("message") or "(no reason given)",
                            10_000)
        elif r["status"] in ("fail", "error"):
            text = one_line(r.get("message") or "(no message)", MESSAGE_CHARS)
        else:
            return None
        key = (r["status"], r["backend"], text)
        return self.notes.setdefault(key, len(self.notes) + 1)

    def lines(self) -> list[str]:
        return [f"{n}. {MARK[s]} ({b}): {_md(t)}" for (s, b, t), n in self.notes.items()]


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def cell_text(results: Sequence[dict[str, Any]], notes: Footnotes) -> str:
    """``MARK [(checks)] ratio [n]…`` and, after ``;``, each lesser verdict other than pass
    with its checks. The checks are named only where the cell's checks disagree."""
    if not results:
        return "—"
    groups: dict[str, list[str]] = {}
    for r in results:
        groups.setdefault(label(r), []).append(r["check"])
    head = worst(results)
    mixed = len(groups) > 1
    text = MARK[head] + (f" ({', '.join(dict.fromkeys(groups[head]))})"
                         if mixed and head != "pass" else "")
    ratio = _ratio_text(max_ratio(results))
    if ratio:
        text += f" {ratio}"
    refs = list(dict.fromkeys(n for r in results if (n := notes.ref(r)) is not None))
    text += "".join(f" [{n}]" for n in refs)
    precisions = sorted({p for p in map(precision_note, results) if p})
    if precisions:  # the working precision a verdict was judged at (CONTRACT §6)
        text += f" ({', '.join(precisions)})"
    rest = [lesser_text(lab, groups[lab])
            for lab in ORDER if lab in groups and lab not in (head, "pass")]
    return "; ".join([text] + rest)


# -- the page ------------------------------------------------------------------------

def _backend_order(cols: Iterable[Column]) -> list[Column]:
    dorder = list(DTYPES)

    def key(c: Column) -> tuple[str, int, str]:
        return (c[0], dorder.index(c[1]) if c[1] in dorder else len(dorder), c[1])

    return sorted(cols, key=key)


def _engines(rep: dict[str, Any], cols: Sequence[Column]) -> str:
    """The backends whose columns come from ``rep``: name, engine versions, dtypes."""
    rows = {b["name"]: b for b in rep.get("backends", [])}
    out = []
    for name in dict.fromkeys(b for b, _d in cols):
        info = rows.get(name, {}).get("info") or {}
        vers = ", ".join(f"{k} {info[k]}" for k in ENGINE_KEYS if info.get(k))
        dts = ", ".join(d for b, d in _backend_order(cols) if b == name)
        out.append(f"{name}{f' ({vers})' if vers else ''}: {dts}")
    return "; ".join(out)


def _env_one(env: dict[str, Any]) -> str:
    cpu = env.get("cpu") or "?"
    if env.get("cpu_count"):
        cpu += f" ×{env['cpu_count']}"
    return (f"torch {env.get('torch') or '—'}, NumPy {env.get('numpy')}, Python "
            f"{env.get('python')}; {cpu}; GPU {env.get('gpu') or 'none'}")


def environment_text(env: dict[str, Any]) -> str:
    """A one-line summary; a merged report of several machines lists each."""
    if isinstance(env.get("machines"), list):
        return " / ".join(_env_one(e) for e in env["machines"])
    return _env_one(env)


def _intact(rep: dict[str, Any]) -> str:
    ok = rep.get("report_id") == rp.report_id(rep)
    return "intact" if ok else "**EDITED** (content does not hash to its id)"


def _counts(labels: Iterable[str]) -> str:
    labels = list(labels)
    return ", ".join(f"{labels.count(s)} {MARK[s]}" for s in ORDER if s in labels) or "none"


INTRO = """\
# lmspec conformance scoreboard

Each `<run-id>.json` here is a conformance report written by `lmspec run` (schema
`lmspec-report/1`): every check of every selected op of the spec, run against one or
more engines (backends) in each dtype, with the tolerance it was held to, its worst
error/tolerance ratio and the environment it ran on; the `.md` beside it is the same
report for people. Its `report_id` is the SHA-256 of its content (without timings).

- **Cite** a report as: "validated against lmspec {version}, report `{rid}`"; \
anyone can check that a file is the one cited: `lmspec verify {file}` says `intact`.
- **Rerun** it with `lmspec replay {file}`: the same selection, settings and seed, \
listing every check whose verdict differs on your machine.
- **Regenerate this page** from the reports with `{command}`; it reads the \
reports listed in `CITED` (a local run's reports in this folder are not tracked).
"""

LEGEND = [
    "Rows are the catalogue's ops; columns are backend × dtype. A cell is the worst verdict "
    "of the op's checks (" + " > ".join(MARK[s] for s in ORDER) + "), then the largest "
    "`worst ratio` (error ÷ tolerance; at most 1 passes) of its judged checks (pass, fail, "
    "deviation), to 3 significant digits.",
    "Where the checks disagree, the worst verdict names its checks and each lesser verdict "
    "other than pass follows after `;` with its checks.",
    "`deviation`: the difference exceeds the tolerance but the backend documents why "
    "(footnote). `partial pass`: fewer than half of the drawn examples were checked (the "
    "backend declined the others). `unsupported`: the backend has no kernel for it; "
    "`no vjp`: the backend computes the op but not its gradient. "
    "`—`: not in any report used.",
    "`[n]` refers to the footnotes under the table: a deviation's documented reason, a "
    "failure's or error's message (cut to 200 characters; the full text, counterexample "
    "and replay command are in the report).",
]


def _ops(results: Iterable[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys([*lmspec.OPS, *(r["op"] for r in results)]))


def scoreboard_markdown(reports: Iterable[dict[str, Any] | Entry]) -> str:
    """The page, from report dicts or ``(file name, report)`` pairs (see :func:`select`)."""
    used, left_out = select(reports)
    if not used:
        return INTRO.split("\n- ")[0] + "\nNo complete report is here yet.\n"
    name0, rep0, _ = used[0]
    out = [INTRO.format(version=rep0["environment"].get("lmspec") or rep0["spec_version"],
                        rid=rep0["report_id"], file=name0, command=COMMAND), "## Reports", ""]
    rows = []
    for name, rep, rcols in used:
        s, env = rep["settings"], rep["environment"]
        rows.append([f"`{Path(name).name}`", f"`{rep['report_id']}`",
                     _engines(rep, rcols), s.get("profile"),
                     s.get("seed"), s.get("max_examples"),
                     env.get("lmspec") or rep["spec_version"], environment_text(env),
                     str(rep["created"])[:10], _intact(rep)])
    out.append(tabulate(rows, ["file", "report_id", "columns used", "profile", "seed",
                               "examples per check", "lmspec", "environment", "date",
                               "verify"], tablefmt="github", disable_numparse=True))
    if left_out:
        out += ["", "Not used: " + "; ".join(f"`{Path(n).name}` ({why})" for n, why in left_out)
                + "."]

    source: dict[Column, dict[str, Any]] = {}
    for _name, rep, cols in used:
        src = {c: rep for c in cols}
        source.update(src)
    cols = _backend_order(source)
    grid: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for (b, d), rep in source.items():
        for r in rep["results"]:
            if (r["backend"], r["dtype"]) == (b, d):
                grid.setdefault((r["op"], b, d), []).append(r)
    results = [r for rs in grid.values() for r in rs]
    notes = Footnotes()
    table = [[f"`{op}`"] + [cell_text(grid.get((op, b, d), []), notes) for b, d in cols]
             for op in _ops(results)]
    out += ["", "## Results (op × backend × dtype)", ""]
    out += [f"- {line}" for line in LEGEND] + [""]
    out.append(tabulate(table, ["op"] + [f"{b} {d}" for b, d in cols], tablefmt="github",
                        disable_numparse=True))
    if notes.notes:
        out += ["", "Footnotes:", ""] + notes.lines()

    out += ["", "## Open findings", ""]
    findings = _findings(grid, cols, notes)
    out += findings or ["None: no check failed or errored in the reports used."]

    out += ["", "## Per backend", ""]
    for b in dict.fromkeys(c[0] for c in cols):
        bcells = [rs for (_op, bb, _d), rs in grid.items() if bb == b]
        checks = [label(r) for rs in bcells for r in rs]
        dts = [d for bb, d in cols if bb == b]
        out.append(f"- **{b}** ({', '.join(dts)}): {len(bcells)} cells — "
                   f"{_counts(worst(rs) for rs in bcells)}; {len(checks)} checks — "
                   f"{_counts(checks)}.")
    return "\n".join(out) + "\n"


def _findings(grid: dict[tuple[str, str, str], list[dict[str, Any]]], cols: Sequence[Column],
              notes: Footnotes) -> list[str]:
    """One line per failed or errored check, in table order, with its replay command."""
    out = []
    ops = _ops(r for rs in grid.values() for r in rs)
    for b, d in cols:
        for op in ops:
            for r in grid.get((op, b, d), []):
                if r["status"] not in ("fail", "error"):
                    continue
                ratio = _ratio_text(max_ratio([r]))
                line = (f"- **{MARK[r['status']]}** {b} {d} `{op}` {r['check']}"
                        + (f", worst ratio {ratio}" if ratio else "")
                        + f" [{notes.ref(r)}]")
                if r.get("reproduce"):
                    line += f"; replay: `{one_line(r['reproduce'], 400)}`"
                out.append(line)
    return out


# -- command -------------------------------------------------------------------------

def load_all(paths: Sequence[str]) -> tuple[list[Entry], list[str]]:
    """The reports at ``paths`` and a warning for each file that is not one."""
    entries, warnings = [], []
    for p in paths:
        try:
            entries.append((p, rp.load(p)))
        except (OSError, ValueError) as exc:
            warnings.append(f"skipped {p}: {exc}")
    return entries, warnings


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lmspec.conformance.scoreboard",
        description="Write the op × backend × dtype scoreboard of the complete reports.")
    ap.add_argument("reports", nargs="*",
                    help=f"JSON reports (default: the ones listed in {CITED})")
    ap.add_argument("-o", "--output", default=DEFAULT_OUTPUT,
                    help=f"the Markdown page to write (default {DEFAULT_OUTPUT})")
    args = ap.parse_args(argv)
    try:
        paths = args.reports or cited()
    except OSError as exc:
        print(f"cannot read the list of cited reports {CITED}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    entries, warnings = load_all(paths)
    for w in warnings:
        print(w, file=sys.stderr)
    used, left_out = select(entries)
    for name, why in left_out:
        print(f"not used {name}: {why}", file=sys.stderr)
    if not used:
        print("no complete report to show; nothing written", file=sys.stderr)
        return 1
    rp._atomic_write(Path(args.output), scoreboard_markdown(entries))
    print(f"wrote {args.output} from {len(used)} report(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
