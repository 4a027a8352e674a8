"""Golden vectors: export, outputs computed by a NumPy-only script, check, report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lmspec
from lmspec.conformance import report
from lmspec.conformance.cli import main
from lmspec.conformance.harness import Settings, Target, run_target

KERNELS = '''
import numpy as np

def softmax(x, axis=-1):
    if x.shape[axis] == 1:  # 1 whatever the value, -inf included (CONTRACT §6)
        return np.ones_like(x)
    e = np.exp(x if BUGGY else x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)

def logsumexp(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    return np.squeeze(m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True)), axis)
'''

SCRIPT = '''
"""Outputs for lmspec vectors, computed with NumPy alone."""
import json, sys
from pathlib import Path
BUGGY = sys.argv[3] == "buggy"
''' + KERNELS + '''
root, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)

def dec(x):
    if isinstance(x, dict) and "npy" in x:
        return np.load(root / x["npy"])
    if isinstance(x, dict) and "tuple" in x:
        return tuple(dec(a) for a in x["tuple"])
    if isinstance(x, dict) and "float" in x:
        return float(x["float"])
    return x

for case in json.loads((root / "manifest.json").read_text())["cases"]:
    fn = globals()[case["op"]]
    args = [dec(a) for a in case["args"]]
    kwargs = {k: dec(v) for k, v in case["kwargs"].items()}
    with np.errstate(all="ignore"):
        np.save(out / case["results"][0], fn(*args, **kwargs))
assert not any(m == "lmspec" or m.startswith("lmspec.") for m in sys.modules)
'''

SEED, COUNT = 5, 12


@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vectors") / "v"
    assert main(["vectors", "export", "--op", "softmax", "--op", "logsumexp", "--dtype",
                 "float32", "--count", str(COUNT), "--seed", str(SEED), str(d)]) == 0
    return d


def outputs_of_script(vectors: Path, tmp: Path, flavour: str) -> Path:
    (tmp / "impl.py").write_text(SCRIPT)
    out = tmp / f"results-{flavour}"
    subprocess.run([sys.executable, "-I", str(tmp / "impl.py"), str(vectors), str(out),
                    flavour], check=True, timeout=120)
    return out


def check(vectors: Path, results: Path, tmp: Path) -> tuple[int, dict]:
    code = main(["vectors", "check", str(vectors), str(results), "--report-dir",
                 str(tmp / "reports")])
    (path,) = (tmp / "reports").glob("*.json")
    return code, json.loads(path.read_text())


def run_records(buggy: bool) -> dict[str, dict]:
    """``lmspec run``'s records (the same harness) on a backend made of the same kernels."""
    ns: dict = {"BUGGY": buggy}
    exec(KERNELS, ns)
    backend = type("B", (), {"name": "b", "device": "cpu", "dtypes": ("float32",),
                             "softmax": staticmethod(ns["softmax"]),
                             "logsumexp": staticmethod(ns["logsumexp"])})()
    return {op: run_target(backend, Target("b", op, "float32", "forward"),
                           Settings(max_examples=COUNT, seed=SEED))
            for op in ("softmax", "logsumexp")}


def run_statuses(buggy: bool) -> dict[str, str]:
    return {op: r["status"] for op, r in run_records(buggy).items()}


def test_export_writes_manifest_format_and_arrays(vectors):
    m = json.loads((vectors / "manifest.json").read_text())
    assert m["format"] == "lmspec-vectors/1" and m["seed"] == SEED and m["count"] == COUNT
    assert (m["c_base"], m["c_floor"]) == (2.0, 4.0)
    assert len(m["cases"]) == 2 * COUNT
    case = m["cases"][0]
    assert case["id"] == "softmax.float32.0000" and case["results"] == ["softmax.float32.0000.npy"]
    out = case["outputs"][0]
    assert out["k"] >= 1 and out["tolerance"] > 0 and len(out["perturbed"]) >= 1
    assert np.load(vectors / out["reference"]).dtype == np.float64
    assert np.load(vectors / case["args"][0]["npy"]).dtype == np.float32
    assert "lmspec-vectors/1" in (vectors / "FORMAT.md").read_text()


def test_numpy_only_outputs_get_the_verdicts_of_lmspec_run(vectors, tmp_path):
    code, rep = check(vectors, outputs_of_script(vectors, tmp_path, "good"), tmp_path)
    assert code == 0
    got = {r["op"]: r for r in rep["results"]}
    ran = run_records(False)
    assert {op: r["status"] for op, r in got.items()} == {op: r["status"] for op, r in
                                                           ran.items()} == {
        "softmax": "pass", "logsumexp": "pass"}
    for op, r in got.items():  # the very examples of the run: the same errors and ratios
        assert (r["max_abs_err"], r["worst_ratio"]) == (ran[op]["max_abs_err"],
                                                        ran[op]["worst_ratio"])
    assert all(r["examples"] == COUNT and r["worst_ratio"] <= 1 for r in got.values())
    assert rep["settings"]["seed"] == SEED and rep["settings"]["profile"] == "vectors"
    assert rep["report_id"] == report.report_id(rep)
    assert rep["backends"][0]["name"] == "results-good"
    assert list((tmp_path / "reports").glob("*.md"))


def test_wrong_outputs_fail_as_lmspec_run_fails(vectors, tmp_path):
    code, rep = check(vectors, outputs_of_script(vectors, tmp_path, "buggy"), tmp_path)
    assert code == 1
    got = {r["op"]: r for r in rep["results"]}
    assert {op: r["status"] for op, r in got.items()} == run_statuses(True) == {
        "softmax": "fail", "logsumexp": "pass"}
    bad = got["softmax"]
    assert "NaN/inf positions must match" in bad["message"] and "cases fail" in bad["message"]
    assert bad["counterexample"]["case"].startswith("softmax.float32.")
    assert bad["reproduce"].startswith("lmspec vectors check ")


def test_missing_results_are_unsupported_and_a_wrong_shape_is_an_error(vectors, tmp_path):
    res = outputs_of_script(vectors, tmp_path, "good")
    for f in res.glob("logsumexp.*.npy"):
        f.unlink()
    np.save(res / "softmax.float32.0003.npy", np.zeros(7))
    code, rep = check(vectors, res, tmp_path)
    got = {r["op"]: r for r in rep["results"]}
    assert code == 1
    assert got["logsumexp"]["status"] == "unsupported"
    assert got["softmax"]["status"] == "error" and "shape" in got["softmax"]["message"]


def test_the_reference_itself_conforms_for_tuple_integer_and_bfloat16_outputs(tmp_path):
    d = tmp_path / "v"
    assert main(["vectors", "export", "--op", "lstm_cell", "--op", "sample_token", "--op",
                 "softmax", "--dtype", "bfloat16", "--count", "3", str(d)]) == 0
    m = json.loads((d / "manifest.json").read_text())
    lstm = next(c for c in m["cases"] if c["op"] == "lstm_cell")
    assert lstm["results"] == [f"{lstm['id']}.0.npy", f"{lstm['id']}.1.npy"]
    res = tmp_path / "ref"
    res.mkdir()
    for c in m["cases"]:
        for name, o in zip(c["results"], c["outputs"]):
            shutil.copy(d / o["reference"], res / name)  # float64 answers: exact
    code, rep = check(d, res, tmp_path)
    assert code == 0
    assert {(r["op"], r["status"]) for r in rep["results"]} == {
        ("lstm_cell", "pass"), ("sample_token", "pass"), ("softmax", "pass")}
    bf = next(c for c in m["cases"] if c["op"] == "softmax")["args"][0]
    assert bf["dtype"] == "bfloat16" and np.load(d / bf["npy"]).dtype == np.float32
    assert lmspec.DTYPES["bfloat16"] is not None


def test_usage_errors(tmp_path):
    assert main(["vectors", "export", "--op", "nope", str(tmp_path / "v")]) == 2
    assert main(["vectors", "check", str(tmp_path), str(tmp_path)]) == 2  # no manifest
