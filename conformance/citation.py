"""Checking a cited report: is the file what its id says, and do its verdicts hold here?

A report's ``report_id`` is the SHA-256 of its canonical JSON (without the id and the
timings). It is a content hash, not a signature: whoever edits a report can compute a
new id, but not keep the one that was cited. So a citation quotes the id, and

- ``lmspec verify REPORT…`` recomputes each id and says ``intact`` or ``edited``;
- ``lmspec replay REPORT`` reruns the report's selection and settings (backends, ops,
  dtypes, checks, profile, examples, seed) on this machine and lists every check whose
  verdict differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import report


def verify(path: str | Path) -> tuple[bool, str]:
    """``(intact, line)`` for one report file."""
    try:
        rep = report.load(path)
    except (OSError, ValueError) as exc:
        return False, f"{path}: unreadable: {exc}"
    claimed = rep.get("report_id", "")
    actual = report.report_id(rep)
    if claimed != actual:
        return False, (f"{path}: edited — it claims {claimed or 'no id'}, but its content "
                       f"hashes to {actual}")
    counts = report.summarize(rep.get("results", []))
    if {k: rep.get("summary", {}).get(k) for k in counts} != counts:
        return False, f"{path}: inconsistent — its summary does not count its results"
    return True, f"{path}: intact {claimed}"


def replay_args(rep: dict[str, Any], report_dir: str) -> list[str]:
    """The ``lmspec run`` arguments that repeat ``rep``'s selection and settings."""
    s = rep["settings"]
    args = ["run", "--profile", str(s.get("profile", "default")), "--seed", str(s.get("seed", 0)),
            "--max-examples", str(s.get("max_examples")), "--report-dir", report_dir]
    for b in s.get("backends", []):
        args += ["--backend", b]
    for op in s.get("ops", []):
        args += ["--op", op]
    for d in s.get("dtypes") or []:
        args += ["--dtype", d]
    checks = s.get("checks")
    if isinstance(checks, list):
        for c in checks:
            args += ["--check", c]
    for mod in s.get("plugins", []):
        args += ["--plugin", mod]
    if s.get("shard"):
        args += ["--shard", str(s["shard"])]
    if s.get("shapes"):
        args += ["--shapes", str(s["shapes"])]
    return args


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per check whose status differs between two reports (or that one lacks)."""
    def key(r: dict[str, Any]) -> tuple[str, str, str, str]:
        return r["backend"], r["op"], r["dtype"], r["check"]

    a = {key(r): r for r in old["results"]}
    b = {key(r): r for r in new["results"]}
    out = []
    for k in list(a) + [k for k in b if k not in a]:
        ra, rb = a.get(k), b.get(k)
        sa = ra["status"] if ra else "absent"
        sb = rb["status"] if rb else "absent"
        if sa != sb:
            why = (rb or {}).get("message", "")[:200]
            out.append(f"{' '.join(k)}: {sa} in the report, {sb} here" + (f" ({why})" if why
                                                                           else ""))
    return out


def summary_lines(paths: Sequence[str]) -> tuple[bool, list[str]]:
    results = [verify(p) for p in paths]
    return all(ok for ok, _ in results), [line for _, line in results]
