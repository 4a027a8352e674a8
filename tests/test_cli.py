"""The command line and the reports it writes (CONTRACT §4, §5)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from lmspec.conformance import report
from lmspec.conformance.cli import main

FIELDS = {"schema", "report_id", "spec_version", "created", "duration_s", "environment",
          "settings", "backends", "results", "summary"}
RESULT_FIELDS = {"backend", "op", "dtype", "check", "status", "examples", "max_abs_err",
                 "max_rel_err", "worst_ratio", "tolerance", "message", "counterexample",
                 "reproduce"}
QUICK = ["run", "--backend", "torch-cpu", "--op", "softmax", "--op", "perplexity",
         "--max-examples", "5"]


def _reports(d):
    return sorted(d.glob("*.json"))


@pytest.mark.slow
def test_run_writes_a_complete_stable_report(tmp_path, capsys):
    assert main([*QUICK, "--report-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr()
    assert "softmax" in out.out and "0 fail" in out.out and "[1/" in out.err
    assert main([*QUICK, "--report-dir", str(tmp_path / "b"), "--jobs", "2"]) == 0
    (a,), (b,) = _reports(tmp_path / "a"), _reports(tmp_path / "b")
    ra, rb = report.load(a), report.load(b)
    assert FIELDS <= set(ra) and ra["schema"] == "lmspec-report/1"
    assert all(RESULT_FIELDS <= set(r) for r in ra["results"])
    assert {r["dtype"] for r in ra["results"]} == {"float16", "bfloat16", "float32", "float64"}
    assert {r["check"] for r in ra["results"] if r["op"] == "softmax"} >= {"forward", "vjp"}
    # every check passes or is a declared deviation (torch's half-precision intermediates)
    s = ra["summary"]
    assert s["pass"] + s["deviation"] == len(ra["results"]) and s["pass"] > s["deviation"]
    assert ra["report_id"] == rb["report_id"] == report.report_id(ra)
    title = f"# lmspec conformance report {ra['report_id']}"
    assert a.with_suffix(".md").read_text().startswith(title)
    assert not list((tmp_path / "a").glob(".*tmp"))  # atomic writes leave nothing behind


def test_report_id_ignores_timings_only():
    rep = report.build([], {"seed": 1}, [], 1.0)
    again = dict(rep, created="2000-01-01T00:00:00+00:00", duration_s=99.0)
    assert report.report_id(again) == rep["report_id"]
    assert report.report_id(dict(rep, settings={"seed": 2})) != rep["report_id"]


@pytest.mark.parametrize("args, msg", [
    (["run", "--backend", "nope"], "--backend 'nope' is not registered"),
    (["run", "--op", "nope*"], "--op 'nope*' matches no op"),
    (["run", "--dtype", "float8"], "--dtype 'float8' is not one of"),
    (["run", "--op", "softmax", "--check", "nope"], "--check 'nope' is not a check"),
    (["run", "--max-examples", "0"], "--max-examples must be at least 1"),
    (["compare", "/nonexistent.json"], "cannot read report"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_usage_exits_2(args, msg, capsys):
    assert main(args) == 2
    assert msg in capsys.readouterr().err


def test_unavailable_backend_asked_by_name_exits_2(capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["run", "--backend", "torch-cuda"]) == 2
    assert "unavailable: no CUDA device" in capsys.readouterr().err


def test_backends_and_ops_json(capsys):
    assert main(["backends", "--json"]) == 0
    rows = {b["name"]: b for b in json.loads(capsys.readouterr().out)}
    assert rows["torch-cpu"]["status"] == "ok"
    assert rows["torch-cpu"]["dtypes"] == ["float16", "bfloat16", "float32", "float64"]
    assert main(["ops", "--json"]) == 0
    ops = {o["op"]: o for o in json.loads(capsys.readouterr().out)}
    assert ops["cross_entropy"]["diff"] == ["logits"] and ops["softmax"]["family"] == "core"
    assert "torch-cpu" in ops["softmax"]["backends"]


@pytest.mark.slow
def test_failures_exit_1_with_replay_and_compare(tmp_path, capsys, monkeypatch):
    """A plugin given with --plugin whose softmax is wrong fails, names the op, and
    its replay command reproduces the failure."""
    plugin = tmp_path / "wrong_plugin.py"
    plugin.write_text(
        "import lmspec, numpy as np\n"
        "class B:\n"
        "    name, device, dtypes = 'wrong', 'cpu', ('float64',)\n"
        "    def softmax(self, x, axis=-1):\n"
        "        return lmspec.softmax(x, axis) + 1e-9 * (x.shape[axis] > 2)\n"
        "@lmspec.hookimpl\n"
        "def register_backends(register):\n"
        "    register(B())\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the backend host imports it
    sys.path.insert(0, str(tmp_path))
    try:
        code = main(["run", "--plugin", "wrong_plugin", "--backend", "wrong", "--op", "softmax",
                     "--max-examples", "30", "--report-dir", str(tmp_path / "r")])
        assert code == 1
        (path,) = _reports(tmp_path / "r")
        rep = report.load(path)
        fail = next(r for r in rep["results"] if r["status"] == "fail")
        assert fail["op"] == "softmax" and "but should be" in fail["message"]
        assert fail["counterexample"]["input"]["args"][0]["shape"][-1] == 3  # shrunk to 3
        assert "--plugin wrong_plugin" in fail["reproduce"]
        replay = fail["reproduce"].split()[1:] + ["--report-dir", str(tmp_path / "replay")]
        assert main(replay) == 1
        assert "### fail: wrong softmax float64" in path.with_suffix(".md").read_text()
        capsys.readouterr()
        assert main(["compare", str(path), *map(str, _reports(tmp_path / "replay"))]) == 0
        assert "[1] wrong float64" in capsys.readouterr().out
    finally:
        sys.path.remove(str(tmp_path))


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "lmspec", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("lmspec ")


def test_docs_catalogue_is_generated_from_the_catalogue():
    import importlib.util
    from pathlib import Path

    import lmspec
    from lmspec.conformance.cli import catalogue_markdown

    docs = Path(__file__).parents[1] / "docs"
    assert "<!-- gen:catalogue -->" in (docs / "catalogue.md").read_text()
    assert "<!-- gen:cli -->" in (docs / "cli.md").read_text()
    spec = importlib.util.spec_from_file_location("docs_gen", docs / "gen.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    page = gen.catalogue()
    assert page.startswith(catalogue_markdown()) and page == gen.catalogue()  # deterministic
    assert all(f"::: lmspec.{d.family}.{op}" in page for op, d in lmspec.OPS.items())
    cli = gen.cli_reference()
    assert "## lmspec run" in cli and "## lmspec compare" in cli and cli == gen.cli_reference()


def test_each_subcommand_help_is_its_own(capsys):
    from lmspec.conformance.cli import EXITS, main, parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(EXITS)
    for name, sp in sub.choices.items():
        assert sp.description and sp.epilog == EXITS[name], name
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "seed of the example search (default: 0)" in out and "--report-dir DIR" in out
    assert main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    assert "side by side" in out and "a verdict differs" in out and "130" not in out


def test_docs_ngram_example_runs():
    import doctest
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "catalogue.md").read_text()
    block = page.split("## Scoring a sentence")[1].split("```python")[1].split("```")[0]
    test = doctest.DocTestParser().get_doctest(block, {}, "docs", "docs/catalogue.md", 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.failures == 0 and runner.tries >= 6
