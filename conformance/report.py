"""Reports: the JSON record of a run (CONTRACT §5), built, identified, written and read.

:func:`write` writes the JSON and has the renderers (:mod:`~lmspec.conformance.markdown`,
:mod:`~lmspec.conformance.html`) write the pages beside it, each atomically (temporary
file + rename). ``report_id`` is the SHA-256 of
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

import lmspec

from .record import STATUSES, jsonable

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
    from . import html, markdown

    base = Path(directory) / run_id(report)
    jpath, mpath, hpath = (base.with_suffix(x) for x in (".json", ".md", ".html"))
    _atomic_write(jpath, json.dumps(report, indent=1, allow_nan=False) + "\n")
    _atomic_write(mpath, markdown.render(report))
    _atomic_write(hpath, html.render(report))
    return jpath, mpath, hpath


def regenerate(path: str | Path, directory: str | Path | None = None, html: bool = True,
               md: bool = True) -> list[Path]:
    """``lmspec report``: the HTML and/or Markdown of the JSON report at ``path``, written
    beside it (or into ``directory``) under the same name."""
    from . import html as html_mod
    from . import markdown

    rep = load(path)
    base = Path(directory or Path(path).parent) / Path(path).stem
    out = []
    if md:
        out.append(base.with_suffix(".md"))
        _atomic_write(out[-1], markdown.render(rep))
    if html:
        out.append(base.with_suffix(".html"))
        _atomic_write(out[-1], html_mod.render(rep))
    return out


def from_journal(path: str | Path) -> dict[str, Any]:
    """The report of a run whose controller died, from the journal it left
    (:class:`lmspec.conformance.runner.Journal`): the checks the journal holds, the others
    ``skipped`` as interrupted (the report is then ``incomplete``). The duration is the sum
    of the checks' durations; the environment is this machine's."""
    from .plan import Target
    from .runner import read_journal, unrun

    header, results = read_journal(path)
    got = {f"{r['backend']}::{r['op']}::{r['dtype']}::{r['check']}": r for r in results}
    targets = header.get("targets") or list(got)
    ordered = [got.get(t) or unrun(Target(*t.split("::", 3)), "interrupted: the run was "
                                   "stopped before this check finished").to_json() for t in targets]
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

