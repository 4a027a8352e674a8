"""Comparison reports: JSON for machines, Markdown (tabulate) for people (CONTRACT §5).

Both are written atomically (temporary file + rename). ``report_id`` is the SHA-256 of
the canonical JSON without ``report_id`` and without timings (``created``,
``duration_s``), so the same seed and settings on the same environment give the same id.
"""

from __future__ import annotations

import hashlib
import json
import math
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


KERNEL_ENV_VARS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "NPY_DISABLE_CPU_FEATURES",
    "ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_MAX_CPU_ISA", "XLA_FLAGS", "JAX_ENABLE_X64",
    "JAX_DEFAULT_MATMUL_PRECISION", "NVIDIA_TF32_OVERRIDE", "CUBLAS_WORKSPACE_CONFIG",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "LMSPEC_TORCH_THREADS", "CUDA_VISIBLE_DEVICES")
"""Environment variables that change which kernels run or how they round."""

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
              "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile",
              "neon", "asimd", "sve", "sve2")


def environment() -> dict[str, Any]:
    """What a reader needs to explain a difference in the last digits: versions, the CPU
    and the SIMD features NumPy dispatches on, the BLAS and its threads, and the
    environment variables that select kernels. Backend-specific builds (torch's
    MKL/oneDNN, its CPU capability, TF32 flags) are in each backend's ``info``.
    Nothing here imports a backend's engine."""
    import hypothesis
    import numpy

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "hypothesis": hypothesis.__version__,
        "lmspec": lmspec.__version__,
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch": _installed("torch"),
        "gpu": None,
        "numpy_simd": _numpy_simd(),
        "blas": _blas(),
        "env": {k: os.environ[k] for k in KERNEL_ENV_VARS if k in os.environ},
    }
    return env


def _installed(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in SIMD_FLAGS if f in have]
    except OSError:
        pass
    return []


def _numpy_simd() -> dict[str, Any]:
    import numpy

    try:
        simd = numpy.show_config(mode="dicts").get("SIMD Extensions", {})
        return {"baseline": simd.get("baseline"), "found": simd.get("found")}
    except Exception:  # noqa: BLE001 - older NumPy
        return {}


def _blas() -> list[dict[str, Any]]:
    """The BLAS libraries loaded in this process, with their threads (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("internal_api", "version", "num_threads", "threading_layer", "architecture")
    return [{k: i.get(k) for k in keep} for i in threadpool_info()]


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
          duration_s: float, incomplete: bool = False,
          extra_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report of a run; ``backends`` are the backends that were run (CONTRACT §6,
    2026-11-29); ``incomplete`` marks a run stopped by a signal."""
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "report_id": "",
        "spec_version": lmspec.SPEC_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(duration_s, 3),
        "environment": {**environment(), **(extra_env or {})},
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


def write(report: dict[str, Any], directory: str | Path) -> tuple[Path, Path, Path]:
    """Write ``<run-id>.json``, ``<run-id>.md`` and ``<run-id>.html`` into ``directory``."""
    from . import html

    base = Path(directory) / run_id(report)
    jpath, mpath, hpath = (base.with_suffix(x) for x in (".json", ".md", ".html"))
    _atomic_write(jpath, json.dumps(report, indent=1, allow_nan=False) + "\n")
    _atomic_write(mpath, markdown(report))
    _atomic_write(hpath, html.render(report))
    return jpath, mpath, hpath


def regenerate(path: str | Path, directory: str | Path | None = None, html: bool = True,
               md: bool = True) -> list[Path]:
    """``lmspec report``: the HTML and/or Markdown of the JSON report at ``path``, written
    beside it (or into ``directory``) under the same name."""
    from . import html as html_mod

    rep = load(path)
    base = Path(directory or Path(path).parent) / Path(path).stem
    out = []
    if md:
        out.append(base.with_suffix(".md"))
        _atomic_write(out[-1], markdown(rep))
    if html:
        out.append(base.with_suffix(".html"))
        _atomic_write(out[-1], html_mod.render(rep))
    return out


def from_journal(path: str | Path) -> dict[str, Any]:
    """The report of a run whose controller died, from the journal it left
    (:class:`lmspec.conformance.runner.Journal`): the checks the journal holds, the others
    ``skipped`` as interrupted (the report is then ``incomplete``). The duration is the sum
    of the checks' durations; the environment is this machine's."""
    from .harness import Target
    from .runner import read_journal, unrun

    header, results = read_journal(path)
    got = {f"{r['backend']}::{r['op']}::{r['dtype']}::{r['check']}": r for r in results}
    targets = header.get("targets") or list(got)
    ordered = [got.get(t) or unrun(Target(*t.split("::", 3)), "interrupted: the run was "
                                   "stopped before this check finished") for t in targets]
    rep = build(ordered, header.get("settings", {}), header.get("backends", []),
                sum(float(r.get("duration_s") or 0.0) for r in results),
                incomplete=any(t not in got for t in targets))
    rep["recovered"] = True  # rebuilt from a journal (CONTRACT §6, 2026-12-06)
    if header.get("dropped"):
        rep["journal_lines_dropped"] = header["dropped"]
    rep["report_id"] = report_id(rep)
    return rep


def load(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not an lmspec report (schema {data.get('schema')!r})")
    return data


# -- tables ------------------------------------------------------------------------

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


def label(r: dict[str, Any]) -> str:
    """A result's verdict for people: its status, or ``partial`` for a partial pass."""
    return "partial" if r["status"] == "pass" and r.get("partial") else r["status"]


def precision_note(r: dict[str, Any]) -> str:
    """The working precision a verdict was judged at where it is not the dtype's own
    (CONTRACT §6): a declared engine mode (``at tf32``) or the precision bound of the
    deviation that excused it (``at float16``); ``""`` otherwise."""
    bound = (r.get("deviation") or {}).get("bound")
    if r["status"] == "deviation" and isinstance(bound, str):
        return f"at {bound}"
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


_num = num


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


def _md(text: str) -> str:
    return text.replace("|", "\\|")


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


def markdown(report: dict[str, Any]) -> str:
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


# -- lmspec compare ----------------------------------------------------------------

def compare_table(reports: Sequence[tuple[str, dict[str, Any]]], fmt: str = "simple"
                  ) -> tuple[str, int]:
    """``lmspec compare`` (see :func:`lmspec.conformance.compare.compare_table`)."""
    from .compare import compare_table as table

    return table(reports, fmt)


# -- counterexamples for people ------------------------------------------------------

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
