"""The pytest plugin (``pytest --lmspec-backend NAME``), run in fresh pytest processes."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "lmspec.conformance.pytest_lmspec"


def _registered() -> bool:
    """Is the entry point installed? (Looked up as pytest does: every distribution, since
    a stale ``*.egg-info`` of the same name may shadow the installed metadata.)"""
    return any(ep.group == "pytest11" and ep.value == PLUGIN
               for d in metadata.distributions() for ep in d.entry_points)


def pytest_run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest in ``cwd`` (outside the project), the example NumPy backend importable."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "examples" / "numpy-backend"),
               LMSPEC_PLUGINS="")
    for var in ("PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"):
        env.pop(var, None)
    load = [] if _registered() else ["-p", PLUGIN]  # an old editable install: load it by name
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *load,
                           "--rootdir", str(cwd), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


SELECT = ("--lmspec-plugin", "lmspec_example_numpy", "--lmspec-op", "softmax", "--lmspec-op",
          "logsumexp", "--lmspec-dtype", "float32", "--lmspec-check", "forward",
          "--lmspec-max-examples", "10")


def test_pyproject_registers_the_plugin_through_pytest11():
    text = (ROOT / "pyproject.toml").read_text()  # (no tomllib on Python 3.10)
    section = text.split("[project.entry-points.pytest11]", 1)[1].split("[", 1)[0]
    assert section.strip() == f'lmspec = "{PLUGIN}"'


def test_without_the_option_the_plugin_adds_and_imports_nothing(tmp_path):
    (tmp_path / "test_plain.py").write_text(
        "import sys\n\ndef test_plain():\n"
        "    assert 'lmspec.conformance.harness' not in sys.modules\n"
        "    assert 'lmspec.backends.discovery' not in sys.modules\n"
        "    assert 'torch' not in sys.modules\n")
    p = pytest_run(tmp_path, "-q")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 passed" in p.stdout
    assert "lmspec" in pytest_run(tmp_path, "--help").stdout  # the options exist


@pytest.mark.slow
def test_one_item_per_check_failures_with_counterexample_under_xdist_and_junit(tmp_path):
    p = pytest_run(tmp_path, "--lmspec-backend", "numpy-example-buggy", *SELECT, "-n", "2",
                   "--junitxml", "out.xml", "-rf")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1 failed, 1 passed" in p.stdout
    text = p.stdout
    assert "FAILED lmspec-numpy-example-buggy::softmax[float32-forward]" in text
    assert "softmax float32 forward: fail" in text
    assert "counterexample (shrunk), runnable:" in text and "dtype=np.float32" in text
    assert ("replay: lmspec run --backend numpy-example-buggy --op softmax --dtype float32 "
            "--check forward --seed 0 --max-examples 10 --plugin lmspec_example_numpy") in text
    assert "or: pytest --lmspec-backend numpy-example-buggy --lmspec-op softmax" in text
    cases = {c.get("name"): c for c in ET.parse(tmp_path / "out.xml").iter("testcase")}
    assert set(cases) == {"softmax[float32-forward]", "logsumexp[float32-forward]"}
    assert cases["softmax[float32-forward]"].find("failure") is not None
    props = {p.get("name"): p.get("value")
             for p in cases["logsumexp[float32-forward]"].iter("property")}
    assert props["lmspec_status"] == "pass" and props["lmspec_examples"] == "10"


def test_k_selects_items_and_unsupported_checks_are_skipped(tmp_path):
    p = pytest_run(tmp_path, "--lmspec-backend", "numpy-example", "--lmspec-plugin",
                   "lmspec_example_numpy", "--lmspec-op", "logsumexp", "--lmspec-op", "perplexity",
                   "--lmspec-dtype", "float32", "--lmspec-max-examples", "5",
                   "-k", "logsumexp and vjp or perplexity", "-rs")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 passed" in p.stdout and "deselected" in p.stdout
    assert "does not implement perplexity" in p.stdout  # skipped: unsupported


def test_an_unknown_backend_is_a_usage_error(tmp_path):
    p = pytest_run(tmp_path, "--lmspec-backend", "no-such-backend", "--lmspec-only")
    assert p.returncode == 4
    assert "--lmspec-backend 'no-such-backend' is not registered" in p.stderr + p.stdout
