"""Golden vectors: the conformance suite for an implementation lmspec cannot call.

``lmspec vectors export`` draws the inputs of the forward checks — the very examples
``lmspec run`` draws for the same seed, op, dtype and count (the same Hypothesis search
with the same seed, stopped at no failure) — and writes them with everything the
verdict needs: the float64 reference outputs, the baseline (the spec evaluated at the
dtype's working precision, rounded to the dtype), the reduction length ``k``, the op's
declared scale and the measured conditioning evaluations
(:mod:`lmspec.conformance.conditioning`), and the tolerance constants. An
implementation anywhere (another language, a device, a script that imports only NumPy)
computes its outputs; ``lmspec vectors check`` judges them with the harness's own
comparison and writes an ordinary report. :data:`FORMAT` (written into the directory as
``FORMAT.md``) is the file format.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "lmspec-vectors/1"

FORMAT = """# lmspec golden vectors (`lmspec-vectors/1`)

Written by `lmspec vectors export`; judged by `lmspec vectors check DIR RESULTS`.

- `manifest.json`: `format`, `spec_version`, `seed` (the exporter's), `count`, `policy`,
  `c_base`, `c_floor`, `unit_roundoff` (per dtype), `working_precision` (per dtype:
  float32 for float16 and bfloat16, whose intermediates are computed in float32,
  CONTRACT §6; the dtype itself otherwise) and `cases`, a list of:
  - `id` (`<op>.<dtype>.<index>`), `op`, `dtype`, `check` (`"forward"`);
  - `args`: the positional arguments, `kwargs`: the keyword arguments exactly as the op
    receives them. An array is `{"npy": "<path>", "dtype": "<dtype>"}`; a tuple is
    `{"tuple": [...]}`; a non-finite float option is `{"float": "nan"|"inf"|"-inf"}`;
    everything else is plain JSON. bfloat16 arrays are stored as float32 `.npy` holding
    the exact bfloat16 values (NumPy alone cannot write bfloat16): convert them to
    bfloat16 before calling the implementation (the conversion is exact);
  - `outputs`: one per output array, in order (tuple outputs flattened depth-first),
    each `name`, `reference` (`.npy`, float64), `baseline` (`.npy`: the spec evaluated
    at the dtype's working precision and rounded to the dtype, widened exactly to
    float64; null when there is none, e.g. float64), `perturbed` (`.npy` list: the
    reference on the inputs perturbed by about `u_w`, the working precision's unit
    roundoff: the measured conditioning), `sensitivity` (`max|perturbed − reference| /
    u_w`), `k`,
    `scale` (the op's declared input scale, or null) and `tolerance` (the absolute
    tolerance this output gets when its NaN/inf positions match);
  - `results`: the file names the implementation writes into RESULTS: `<id>.npy` for an
    op with one output array, `<id>.<j>.npy` for output `j` otherwise (float outputs in
    any float dtype NumPy can read — write bfloat16 outputs as float32 —, integer
    outputs as integers). A missing file means the implementation does not support that
    case (`unsupported`).
- Tolerance, per output: `max|b − r| ≤ c_base·max|baseline − r| + c_floor·√k·u_w·M +
  u_d·max|r|` with `M = max(max|r|, scale, sensitivity)`, `u_w` the working precision's
  unit roundoff and `u_d` the dtype's (the last term, the output's own rounding, only
  where the dtype is coarser than its working precision: float16 and bfloat16); NaN
  and ±inf must match position for position
  (a finite reference beyond the dtype's range may be answered with the infinity it
  rounds to). Ops with integer outputs are judged by their exact rule (sampling and
  masking decisions, ambiguous ones excepted).
"""


# -- encoding --------------------------------------------------------------------------

def _encode(x: Any, base: Path, stem: str, dtype: str) -> Any:
    if isinstance(x, np.ndarray):
        from lmspec._precision import DTYPES

        stored = x.astype(np.float32) if x.dtype == DTYPES["bfloat16"] else x
        np.save(base / f"{stem}.npy", stored, allow_pickle=False)
        return {"npy": f"cases/{base.name}/{stem}.npy", "dtype": str(x.dtype)}
    if isinstance(x, (tuple, list)):
        return {"tuple": [_encode(a, base, f"{stem}.{i}", dtype) for i, a in enumerate(x)]}
    if isinstance(x, (np.floating, float)) and not math.isfinite(float(x)):
        return {"float": repr(float(x))}
    if isinstance(x, np.generic):
        return x.item()
    return x


def _decode(x: Any, root: Path) -> Any:
    if isinstance(x, dict) and "npy" in x:
        from lmspec._precision import DTYPES

        a = np.load(root / x["npy"], allow_pickle=False)
        return a.astype(DTYPES[x["dtype"]]) if x["dtype"] == "bfloat16" else a
    if isinstance(x, dict) and "tuple" in x:
        return tuple(_decode(a, root) for a in x["tuple"])
    if isinstance(x, dict) and "float" in x:
        return float(x["float"])
    return x


def _select(globs: list[str]) -> list[str]:
    import lmspec
    from lmspec.conformance.cli_common import UsageError

    from .harness import CASES  # importing the harness declares every family's cases

    ops = [o for o in lmspec.OPS if o in CASES]
    if not globs:
        return ops
    for g in globs:
        if not any(fnmatch.fnmatchcase(o, g) for o in ops):
            raise UsageError(f"--op {g!r} matches no op; the catalogue has: {', '.join(ops)}")
    return [o for o in ops if any(fnmatch.fnmatchcase(o, g) for g in globs)]


# -- export ----------------------------------------------------------------------------

def draw_calls(op: str, dtype: str, count: int, seed_: int) -> list[Any]:
    """The inputs ``lmspec run`` draws for ``op``'s forward check in ``dtype`` with
    ``--seed seed_ --max-examples count``, in order (the same search, no failure)."""
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st

    from .declare import CASES
    from .harness import Target, check_drawn_dtypes, seed_of

    oc = CASES[op]
    calls: list[Any] = []

    def example(data: Any) -> None:
        with np.errstate(all="ignore"):
            drawn = data.draw(oc.strategy(dtype), label="input")
        check_drawn_dtypes(drawn, dtype, f"{op} forward")
        calls.append(drawn)

    test = settings(
        max_examples=count, deadline=None, database=None, derandomize=False,
        print_blob=False, report_multiple_bugs=False,
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )(seed(seed_of(Target("", op, dtype, "forward"), seed_))(given(st.data())(example)))
    test()
    return calls


def export(directory: str | Path, ops: list[str], dtypes: list[str], count: int,
           seed_: int) -> Path:
    """Write the vectors of ``ops`` × ``dtypes`` into ``directory``; the manifest's path."""
    import lmspec
    from lmspec._precision import UNIT_ROUNDOFF

    from . import harness, tolerance
    from .declare import CASES

    root = Path(directory)
    (root / "cases").mkdir(parents=True, exist_ok=True)
    cases = []
    for op in ops:
        oc = CASES[op]
        for dt in dtypes:
            u = UNIT_ROUNDOFF[tolerance.compute_dtype(tolerance.working_precision(dt))]
            for i, call in enumerate(draw_calls(op, dt, count, seed_)):
                cid = f"{op}.{dt}.{i:04d}"
                base_dir = root / "cases" / cid
                base_dir.mkdir(exist_ok=True)
                with np.errstate(all="ignore"):
                    ref = harness.reference(op, call)
                    base = harness.baseline(op, call, dt)
                    pert = harness.perturbed_reference(op, call, dt)
                k = int(oc.k(call))
                scale = oc.scale(call, None) if oc.scale else None
                refs = harness.named(ref, "out")
                bases = harness.named(base, "out") if base is not None else [
                    (n, None) for n, _ in refs]
                evals = [harness.named(p, "out") for p in pert if p is not None]
                outputs = []
                for j, ((name, r), (_, s)) in enumerate(zip(refs, bases)):
                    if r is None:
                        outputs.append({"name": name, "reference": None})
                        continue
                    stem = f"cases/{cid}/out{j}"
                    np.save(root / f"{stem}.ref.npy", np.asarray(r), allow_pickle=False)
                    rec: dict[str, Any] = {"name": name, "reference": f"{stem}.ref.npy",
                                           "baseline": None, "perturbed": [], "k": k,
                                           "scale": None if scale is None else float(scale)}
                    if s is not None:
                        np.save(root / f"{stem}.base.npy", np.asarray(s), allow_pickle=False)
                        rec["baseline"] = f"{stem}.base.npy"
                    sens = 0.0
                    for e, ev in enumerate(evals):
                        q = ev[j][1]
                        if q is None:
                            continue
                        np.save(root / f"{stem}.pert{e}.npy", np.asarray(q), allow_pickle=False)
                        rec["perturbed"].append(f"{stem}.pert{e}.npy")
                        ra, qa = np.asarray(r, np.float64), np.asarray(q, np.float64)
                        if ra.dtype.kind == "f" and qa.shape == ra.shape:
                            ok = np.isfinite(ra) & np.isfinite(qa)
                            sens = max(sens, float(np.where(ok, np.abs(qa - ra), 0).max(
                                initial=0.0)))
                    rec["sensitivity"] = sens / u
                    if oc.compare is None:
                        v = tolerance.compare(name, r, r, s, dt, k, scale, perturbed=[
                            np.load(root / p) for p in rec["perturbed"]])
                        rec["tolerance"] = v.tol
                    outputs.append(rec)
                n_arrays = sum(1 for o in outputs if o["reference"] is not None)
                single = len(outputs) == 1 and not isinstance(ref, tuple)
                kwargs = harness.op_kwargs(op, call, dt)
                cases.append({
                    "id": cid, "op": op, "dtype": dt, "check": "forward",
                    "args": _encode(tuple(call.args), base_dir, "arg", dt)["tuple"],
                    "kwargs": {key: _encode(v, base_dir, f"kw.{key}", dt)
                               for key, v in kwargs.items()},
                    "outputs": outputs,
                    "results": [f"{cid}.npy"] if single else [
                        f"{cid}.{j}.npy" for j in range(len(outputs))],
                    "output_arrays": n_arrays,
                })
    manifest = {
        "format": FORMAT_NAME, "spec_version": lmspec.SPEC_VERSION,
        "lmspec": lmspec.__version__, "seed": seed_, "count": count, "ops": ops,
        "dtypes": dtypes, "policy": tolerance.POLICY, "c_base": tolerance.C_BASE,
        "c_floor": tolerance.C_FLOOR, "unit_roundoff": {d: UNIT_ROUNDOFF[d] for d in dtypes},
        "working_precision": {d: tolerance.working_precision(d) for d in dtypes},
        "cases": cases,
    }
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    (root / "FORMAT.md").write_text(FORMAT, encoding="utf-8")
    return path


# -- check -----------------------------------------------------------------------------

def _load_result(results: Path, case: dict[str, Any]) -> tuple[Any, ...] | None:
    files = [results / f for f in case["results"]]
    if len(files) == 1 and not files[0].exists():
        alt = results / f"{case['id']}.0.npy"
        files = [alt] if alt.exists() else files
    if not all(f.exists() for f in files):
        return None
    return tuple(np.load(f, allow_pickle=False) for f in files)


def judge(directory: str | Path, results: str | Path, name: str) -> list[dict[str, Any]]:
    """One result record per (op, dtype) of the vectors, judging the outputs in
    ``results`` with the harness's comparison (the first failing case is the
    counterexample; the message counts the failing cases)."""
    from .calls import BackendError, Mismatch
    from .declare import CASES, Call
    from .record import Stats

    root, res_dir = Path(directory), Path(results)
    manifest = load_manifest(root)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in manifest["cases"]:
        groups.setdefault((c["op"], c["dtype"]), []).append(c)
    out = []
    for (op, dt), cases in groups.items():
        t0 = time.perf_counter()
        stats = Stats()
        first: dict[str, Any] | None = None
        status, message, failing = "pass", "", 0
        for c in cases:
            kwargs = {k: _decode(v, root) for k, v in c["kwargs"].items()}
            call = Call(tuple(_decode(a, root) for a in c["args"]), kwargs)
            got = _load_result(res_dir, c)
            if got is None:
                stats.unsupported += 1
                stats.unsupported_reason = f"no result file {c['results'][0]}"
                continue
            stats.examples += 1
            stats.begin()
            try:
                _judge_case(c, call, got, root, dt, stats, CASES[op])
            except Mismatch as exc:
                failing += 1
                if first is None:
                    first = {"case": c["id"], "input": call, "message": str(exc)}
            except BackendError as exc:
                first, status = {"case": c["id"], "input": call, "message": str(exc)}, "error"
                message = f"{exc} (case {c['id']})"
                break
            finally:
                stats.end()
        if status != "error" and failing:
            status = "fail"
            message = (f"{first['message']} (case {first['case']}; {failing} of "
                       f"{stats.examples} cases fail)")
        elif status == "pass" and stats.examples == 0:
            status, message = "unsupported", stats.unsupported_reason or "no result"
        elif status == "pass" and stats.unsupported:
            message = (f"{stats.unsupported} of {len(cases)} cases unsupported: "
                       f"{stats.unsupported_reason}")
        out.append(_record(name, op, dt, status, message, stats, first, manifest, root,
                           res_dir, time.perf_counter() - t0))
    return out


def _judge_case(c: dict[str, Any], call: Any, got: tuple[Any, ...], root: Path, dt: str,
                stats: Any, oc: Any) -> None:
    """Judge one case's result files with the harness's comparison (raises the judge's
    ``Mismatch`` or ``BackendError``)."""
    from .calls import BackendError, as_result, output
    from .declare import OpCases
    from .judge import compare_outputs

    if len(got) != len(c["results"]):
        raise BackendError(f"{len(got)} result files, but should be {len(c['results'])}")
    for j, o in enumerate(c["outputs"]):
        if o["reference"] is None:
            continue
        ref = np.load(root / o["reference"], allow_pickle=False)
        base = np.load(root / o["baseline"], allow_pickle=False) if o["baseline"] else None
        files = o["perturbed"]
        fixed = OpCases(c["op"], oc.strategy, lambda _c, k=o["k"]: k,
                        (lambda _c, _cot, s=o["scale"]: s) if o["scale"] is not None else None,
                        oc.compare)
        g = output(got[j], f"{c['op']}()")
        compare_outputs(fixed, call, g, as_result(ref),
                        None if base is None else as_result(base), dt, stats,
                        o["name"], pert=lambda files=files: [as_result(
                            np.load(root / p, allow_pickle=False)) for p in files])


def _record(name: str, op: str, dt: str, status: str, message: str, stats: Any,
            first: dict[str, Any] | None, manifest: dict[str, Any], root: Path, res_dir: Path,
            duration: float) -> dict[str, Any]:
    """The check's result record (a :class:`~lmspec.conformance.record.CheckResult`)."""
    import lmspec

    from . import tolerance
    from .record import CheckResult, jsonable, ratio_distribution

    r = CheckResult(
        name, op, dt, "forward", status, stats.examples, jsonable(stats.max_abs),
        jsonable(stats.max_rel), jsonable(stats.worst_ratio),
        {"policy": tolerance.POLICY, "c_base": manifest["c_base"],
         "c_floor": manifest["c_floor"], "u": tolerance.floor_u(dt),
         "working_precision": tolerance.working_precision(dt),
         "u_dtype": lmspec._precision.UNIT_ROUNDOFF[dt], "at_worst": jsonable(stats.worst_tol)},
        message, duration_s=round(duration, 3), unsupported_examples=stats.unsupported)
    if stats.ambiguous:
        r.extra["ambiguous_examples"] = stats.ambiguous
    dist = ratio_distribution(stats.ratios)
    if dist:
        r.extra["ratio_distribution"] = dist
    if first is not None and status in ("fail", "error"):
        r.counterexample = jsonable(first)
        r.reproduce = f"lmspec vectors check {root} {res_dir} --op {op} --dtype {dt}"
    return r.to_json()


def load_manifest(root: Path) -> dict[str, Any]:
    from lmspec.conformance.cli_common import UsageError

    try:
        m = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {root / 'manifest.json'}: {exc}") from None
    if m.get("format") != FORMAT_NAME:
        raise UsageError(f"{root}: not lmspec vectors (format {m.get('format')!r})")
    return m


# -- command line ----------------------------------------------------------------------

def configure_parser(p: argparse.ArgumentParser) -> None:
    """The ``lmspec vectors`` subcommands (``export``, ``check``)."""
    sub = p.add_subparsers(dest="vectors_command", required=True)
    e = sub.add_parser("export", help="write inputs, references and tolerance data")
    e.add_argument("--op", action="append", default=[], metavar="GLOB")
    e.add_argument("--dtype", action="append", default=None, metavar="D")
    e.add_argument("--count", type=int, default=20, metavar="N",
                   help="examples per (op, dtype), as --max-examples of lmspec run")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("directory", metavar="DIR")
    e.set_defaults(func=cmd_export)
    c = sub.add_parser("check", help="judge outputs computed elsewhere and write a report")
    c.add_argument("directory", metavar="DIR")
    c.add_argument("results", metavar="RESULTS")
    c.add_argument("--name", default=None, help="the implementation's name in the report "
                   "(default: RESULTS' directory name)")
    c.add_argument("--op", action="append", default=[], metavar="GLOB")
    c.add_argument("--dtype", action="append", default=None, metavar="D")
    c.add_argument("--report-dir", default="reports", metavar="DIR")
    c.set_defaults(func=cmd_check)


def cmd_export(args: argparse.Namespace) -> int:
    from lmspec._precision import DTYPES
    from lmspec.conformance.cli_common import UsageError

    dtypes = args.dtype or list(DTYPES)
    for d in dtypes:
        if d not in DTYPES:
            raise UsageError(f"--dtype {d!r} is not one of {', '.join(DTYPES)}")
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    with np.errstate(all="ignore"):
        path = export(args.directory, _select(args.op), dtypes, args.count, args.seed)
    n = len(json.loads(path.read_text())["cases"])
    print(f"wrote {n} cases to {path} (format: {path.parent / 'FORMAT.md'})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from lmspec.conformance import report, runner
    from lmspec.conformance.cli_common import UsageError

    root, res = Path(args.directory), Path(args.results)
    if not res.is_dir():
        raise UsageError(f"RESULTS {res} is not a directory")
    manifest = load_manifest(root)
    name = args.name or res.resolve().name
    t0 = time.perf_counter()
    with np.errstate(all="ignore"):
        judged = judge(root, res, name)
    results = [r for r in judged
               if (not args.op or any(fnmatch.fnmatchcase(r["op"], g) for g in args.op))
               and (not args.dtype or r["dtype"] in args.dtype)]
    try:
        report_dir = runner.check_report_dir(args.report_dir)
    except OSError as exc:
        raise UsageError(f"cannot write reports to --report-dir {args.report_dir}: {exc}"
                         ) from None
    digest = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    settings = {"profile": "vectors", "max_examples": manifest["count"],
                "seed": manifest["seed"], "ops": sorted({r["op"] for r in results}),
                "dtypes": sorted({r["dtype"] for r in results}), "checks": ["forward"],
                "backends": [name], "vectors": f"sha256:{digest}"}
    row = {"name": name, "device": "", "dtypes": settings["dtypes"], "plugin": "vectors",
           "source": "vectors", "version": "", "status": "ok",
           "info": {"vectors": str(root), "manifest": f"sha256:{digest}"}}
    rep = report.build(results, settings, [row], time.perf_counter() - t0)
    paths = report.write(rep, report_dir)
    for r in results:
        print(f"{r['status']:<11} {name} {r['op']} {r['dtype']} forward"
              + (f": {r['message']}" if r["message"] else ""))
    s = rep["summary"]
    print(", ".join(f"{s[k]} {k}" for k in s) + f" — report {rep['report_id']}")
    print("written: " + " and ".join(str(p) for p in paths))
    return 1 if any(r["status"] in ("fail", "error") for r in results) else 0
