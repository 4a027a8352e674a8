"""The example packages under examples/, installed as a user would and run by `lmspec run`.

Both packages are built from copies (the checkout stays clean) and installed with
``pip install --no-deps --no-build-isolation --target`` into a temporary directory that
the commands get on ``PYTHONPATH``: their entry points are found exactly like those of
installed distributions, and the test environment itself is left untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("numpy-backend", "torch-kernel")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a shell in which both examples are installed."""
    tmp = tmp_path_factory.mktemp("examples")
    for name in EXAMPLES:
        shutil.copytree(ROOT / "examples" / name, tmp / name,
                        ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site),
                    *(str(tmp / n) for n in EXAMPLES)], check=True, capture_output=True,
                   cwd=tmp, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(site), LMSPEC_PLUGINS="")
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def lmspec(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmspec.conformance.cli", *args], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def report(report_dir: Path) -> dict:
    (path,) = report_dir.glob("*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_the_numpy_backend_conforms_and_its_buggy_twin_fails_on_softmax(installed, tmp_path):
    p = lmspec(installed, tmp_path, "run", "--backend", "numpy-example", "--backend",
               "numpy-example-buggy", "--op", "*softmax", "--op", "logsumexp", "--op",
               "cross_entropy", "--dtype", "float32", "--check", "forward", "--check", "vjp",
               "--max-examples", "8",
               "--report-dir", "out")
    assert p.returncode == 1, p.stdout + p.stderr
    rep = report(tmp_path / "out")
    plugins = {b["name"]: (b["plugin"], b["source"]) for b in rep["backends"]}
    assert plugins["numpy-example"] == ("numpy-example (lmspec-example-numpy 0.1.0)",
                                        "entry point")
    good = [r for r in rep["results"] if r["backend"] == "numpy-example"]
    assert {r["op"] for r in good} == {"softmax", "log_softmax", "logsumexp", "cross_entropy"}
    assert {r["check"] for r in good} >= {"forward", "vjp"}
    assert all(r["status"] == "pass" for r in good), [r for r in good if r["status"] != "pass"]
    bad = {(r["op"], r["check"]): r for r in rep["results"]
           if r["backend"] == "numpy-example-buggy"}
    assert bad[("softmax", "forward")]["status"] == "fail"
    assert "NaN/inf positions must match" in bad[("softmax", "forward")]["message"]
    assert bad[("logsumexp", "forward")]["status"] == "pass"
    assert bad[("cross_entropy", "forward")]["status"] == "pass"
    assert "softmax" in p.stdout and "fail" in p.stdout


@pytest.mark.slow
def test_the_torch_kernel_conforms_and_inherits_the_rest(installed, tmp_path):
    p = lmspec(installed, tmp_path, "run", "--backend", "torch-kernel-cpu", "--op", "softmax",
               "--op", "cross_entropy", "--dtype", "bfloat16", "--check", "forward",
               "--check", "vjp", "--max-examples", "10", "--report-dir", "out")
    assert p.returncode == 0, p.stdout + p.stderr
    rep = report(tmp_path / "out")
    assert rep["backends"][0]["dtypes"] == ["float16", "bfloat16", "float32", "float64"]
    assert len(rep["results"]) == 4
    assert all(r["status"] == "pass" for r in rep["results"])


def test_the_torch_kernel_backend_uses_its_own_softmax():
    sys.path.insert(0, str(ROOT / "examples" / "torch-kernel"))
    try:
        from lmspec_torch_kernel import kernels
        from lmspec_torch_kernel.plugin import KernelBackend
    finally:
        sys.path.remove(str(ROOT / "examples" / "torch-kernel"))
    b = KernelBackend("k", "cpu", ("float32",))
    assert b._impls["softmax"] is kernels.softmax
    assert not any(k.startswith("softmax") for k in b.deviations)
    assert "cross_entropy/forward/float16" in KernelBackend("k", "cpu", ("float16",)).deviations
