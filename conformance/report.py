"""Comparison reports: JSON for machines, Markdown (tabulate) for people (CONTRACT §5).

Both are written atomically (temporary file + rename). ``report_id`` is the SHA-256 of
the canonical JSON without ``report_id`` and without timings (``created``,
``duration_s``), so the same seed and settings on the same environment give the same id.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tabulate import tabulate

import lmspec

from .harness import STATUSES, jsonable

SCHEMA = "lmspec-report/1"
TIMING_KEYS = ("created", "duration_s")


def environment() -> dict[str, Any]:
    import hypothesis
    import numpy

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "hypothesis": hypothesis.__version__,
        "lmspec": lmspec.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": None,
        "gpu": None,
    }
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001 - the report is still useful without torch
        pass
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _strip_timings(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip_timings(v) for k, v in x.items() if k not in TIMING_KEYS}
    if isinstance(x, list):
        return [_strip_timings(v) for v in x]
    return x


def canonical(report: dict[str, Any]) -> bytes:
    body = _strip_timings({k: v for k, v in report.items() if k != "report_id"})
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def report_id(report: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical(report)).hexdigest()


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for r in results:
        counts[r["status"]] += 1
    return counts


def build(results: list[dict[str, Any]], settings: dict[str, Any], backends: list[dict[str, Any]],
          duration_s: float, incomplete: bool = False) -> dict[str, Any]:
    """The report of a run; ``backends`` are the backends that were run (CONTRACT §6,
    2026-11-29); ``incomplete`` marks a run stopped by a signal."""
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "report_id": "",
        "spec_version": lmspec.SPEC_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(duration_s, 3),
        "environment": environment(),
        "settings": settings,
        "backends": backends,
        "results": results,
        "summary": summarize(results),
    }
    if incomplete:
        report["incomplete"] = True
    report = jsonable(report)
    report["report_id"] = report_id(report)
    return report


def run_id(report: dict[str, Any]) -> str:
    stamp = report["created"].replace(":", "").replace("-", "").replace("+0000", "Z")
    return f"{stamp[:15]}-{report['report_id'].split(':')[1][:12]}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``:
    a reader sees the old file or the new one, never half of one. The file gets the
    usual mode for a new file (0644 under umask 022), not ``mkstemp``'s 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write(report: dict[str, Any], directory: str | Path) -> tuple[Path, Path]:
    """Write ``<run-id>.json`` and ``<run-id>.md`` into ``directory``."""
    base = Path(directory) / run_id(report)
    jpath, mpath = base.with_suffix(".json"), base.with_suffix(".md")
    _atomic_write(jpath, json.dumps(report, indent=1, allow_nan=False) + "\n")
    _atomic_write(mpath, markdown(report))
    return jpath, mpath


def load(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not an lmspec report (schema {data.get('schema')!r})")
    return data


# -- tables ------------------------------------------------------------------------

MARK = {"pass": "pass", "fail": "FAIL", "error": "ERROR", "deviation": "deviation",
        "unsupported": "unsupported", "skipped": "skipped"}
SEVERITY = ("error", "fail", "deviation", "pass", "unsupported", "skipped")


def cell(results: Sequence[dict[str, Any]]) -> str:
    """One op × backend × dtype cell: the worst status, with the checks that had it."""
    if not results:
        return ""
    worst = min((r["status"] for r in results), key=SEVERITY.index)
    if worst == "pass":
        return "pass"
    bad = sorted({r["check"] for r in results if r["status"] == worst})
    return f"{MARK[worst]} ({', '.join(bad)})"


def comparison(results: Sequence[dict[str, Any]], label: str = "") -> tuple[list[str], list[list]]:
    """Rows: ops; columns: backend/dtype (prefixed by ``label`` when comparing reports)."""
    cols = list(dict.fromkeys((r["backend"], r["dtype"]) for r in results))
    ops = list(dict.fromkeys(r["op"] for r in results))
    headers = ["op"] + [f"{label}{b} {d}" for b, d in cols]
    rows = [[op] + [cell([r for r in results if r["op"] == op and (r["backend"], r["dtype"]) == c])
                    for c in cols] for op in ops]
    return headers, rows


def _num(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) else str(x)


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    env = report["environment"]
    out = [f"# lmspec conformance report {report['report_id']}", "",
           f"- spec version: {report['spec_version']} (lmspec {env.get('lmspec')})",
           f"- created: {report['created']}, duration {report['duration_s']} s",
           f"- settings: profile `{s.get('profile')}`, {s.get('max_examples')} examples per check, "
           f"seed {s.get('seed')}",
           f"- environment: Python {env.get('python')}, NumPy {env.get('numpy')}, torch "
           f"{env.get('torch')}, Hypothesis {env.get('hypothesis')}; CPU {env.get('cpu')}; "
           f"GPU {env.get('gpu') or 'none'}; {env.get('platform')}",
           "- summary: " + ", ".join(f"{v} {k}" for k, v in report["summary"].items()), "",
           "## Backends", ""]
    out.append(tabulate([[b["name"], b["device"], ", ".join(b["dtypes"]), b.get("plugin", ""),
                          b["version"], b["status"]] for b in report["backends"]],
                        ["backend", "device", "dtypes", "plugin", "version", "status"],
                        tablefmt="github"))
    out += ["", "## Results (op × backend × dtype)", ""]
    headers, rows = comparison(report["results"])
    out.append(tabulate(rows, headers, tablefmt="github") if rows else "(no results)")
    out += ["", "## Checks", ""]
    out.append(tabulate(
        [[r["op"], r["backend"], r["dtype"], r["check"], r["status"], r["examples"],
          _num(r["max_abs_err"]), _num(r["worst_ratio"])] for r in report["results"]],
        ["op", "backend", "dtype", "check", "status", "examples", "max abs err", "worst ratio"],
        tablefmt="github"))
    notable = [r for r in report["results"] if r["status"] in ("fail", "error", "deviation")]
    if notable:
        out += ["", "## Failures, errors and deviations", ""]
    for r in notable:
        out += [f"### {r['status']}: {r['backend']} {r['op']} {r['dtype']} {r['check']}", "",
                r["message"], ""]
        if r.get("deviation_reason"):
            out += [f"Documented reason: {r['deviation_reason']}", ""]
        if r.get("counterexample") is not None:
            ce = json.dumps(r["counterexample"], separators=(",", ":"))
            out += ["Counterexample (shrunk):", "", "```json",
                    ce if len(ce) < 4000 else ce[:4000] + " …(truncated; full in the JSON report)",
                    "```", ""]
        if r.get("reproduce"):
            out += ["Replay:", "", "```sh", r["reproduce"], "```", ""]
    out += ["", "## Tolerance policy", "",
            "Per output array: `" + (report["results"][0]["tolerance"] or {}).get("policy", "")
            + "`" if report["results"] and report["results"][0].get("tolerance") else "", ""]
    return "\n".join(out) + "\n"


def compare_table(reports: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Side-by-side table of several reports (``lmspec compare``)."""
    results: list[dict[str, Any]] = []
    for i, (_, rep) in enumerate(reports):
        results += [dict(r, backend=f"[{i + 1}] {r['backend']}") for r in rep["results"]]
    headers, rows = comparison(results)
    legend = "\n".join(f"[{i + 1}] {name}: {rep['report_id']} ({rep['created']}, "
                       f"{', '.join(f'{v} {k}' for k, v in rep['summary'].items() if v)})"
                       for i, (name, rep) in enumerate(reports))
    return legend + "\n\n" + tabulate(rows, headers, tablefmt="github") + "\n"

