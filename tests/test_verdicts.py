"""Verdicts that never overstate: status rules, narrow deviations, verifiable reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lmspec
from lmspec.conformance import harness, report
from lmspec.conformance.cli import main
from lmspec.conformance.harness import Settings, Target, run_target

TESTS = Path(__file__).parent


class Softmax:
    """A correct softmax with knobs: decline some examples, get some wrong."""

    name, device, dtypes = "knobs", "cpu", ("float32", "float64")

    def __init__(self, decline=lambda x: False, wrong=lambda x: False, deviations=None):
        self._decline, self._wrong = decline, wrong
        self.deviations = deviations or {}

    def softmax(self, x, axis=-1):
        if self._decline(x):
            raise NotImplementedError("declined")
        out = lmspec.softmax(x, axis).astype(x.dtype)
        return out + 0.1 if self._wrong(x) else out


def _run(b: Softmax, dtype: str = "float64", n: int = 60) -> dict:
    return run_target(b, Target(b.name, "softmax", dtype, "forward"), Settings(max_examples=n),
                      b.deviations)


def test_a_check_nothing_of_which_ran_is_unsupported_not_pass():
    res = _run(Softmax(decline=lambda x: True))
    assert res["status"] == "unsupported" and res["examples"] == 0
    assert res["unsupported_examples"] > 0


def test_declining_one_dtype_of_one_op_is_unsupported_for_that_dtype_only():
    b = Softmax(decline=lambda x: x.dtype == np.float32)
    assert _run(b, "float32")["status"] == "unsupported"
    assert _run(b, "float64")["status"] == "pass"


def test_a_check_that_ran_few_examples_is_a_marked_partial_pass():
    res = _run(Softmax(decline=lambda x: x.size > 1))
    assert res["status"] == "pass" and res["partial"] is True
    assert res["examples"] < harness.MIN_CHECKED_FRACTION * (
        res["examples"] + res["unsupported_examples"])
    assert res["message"].startswith("partial pass: only")
    full = _run(Softmax())
    assert "partial" not in full and full["unsupported_examples"] == 0


def test_shrink_replays_are_not_counted_as_examples():
    res = _run(Softmax(wrong=lambda x: x.size > 3), n=100)
    assert res["status"] == "fail"
    assert res["examples"] <= 100 and res["shrink_replays"] > 0


def test_a_deviation_with_a_predicate_covers_its_examples_only():
    last3 = lmspec.Deviation("known: rows of 3", applies=lambda args, kw: args[0].shape[-1] == 3)
    covered = _run(Softmax(wrong=lambda x: x.shape[-1] == 3,
                           deviations={"softmax/forward": last3}))
    assert covered["status"] == "deviation" and covered["deviation_examples"] > 0
    assert covered["deviation_reason"] == "known: rows of 3"
    assert covered["counterexample"]["input"]["args"][0]["shape"][-1] == 3
    other_bug = _run(Softmax(wrong=lambda x: x.shape[-1] in (3, 5),
                             deviations={"softmax/forward": last3}), n=200)
    assert other_bug["status"] == "fail"  # the search went on past the declared deviation
    assert other_bug["counterexample"]["input"]["args"][0]["shape"][-1] == 5


def test_the_narrowest_deviation_key_wins_and_other_dtypes_still_fail():
    every = lmspec.Deviation("f32 only", applies=lambda args, kw: True)
    b = Softmax(wrong=lambda x: True, deviations={"softmax/forward/float32": every})
    assert _run(b, "float32")["status"] == "deviation"
    assert _run(b, "float64")["status"] == "fail"


@pytest.fixture(scope="module")
def small_report(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("r")
    assert main(["run", "--backend", "torch-cpu", "--op", "softmax", "--dtype", "float64",
                 "--max-examples", "5", "--report-dir", str(d)]) == 0
    (path,) = d.glob("*.json")
    return path


def test_verify_tells_intact_from_edited(small_report, tmp_path, capsys):
    assert main(["verify", str(small_report)]) == 0
    assert "intact sha256:" in capsys.readouterr().out
    rep = json.loads(small_report.read_text())
    was = rep["results"][0]["status"]
    rep["results"][0]["status"] = "error"  # and the summary edited to match
    rep["summary"][was] -= 1
    rep["summary"]["error"] += 1
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(rep))
    assert main(["verify", str(small_report), str(edited)]) == 1
    assert "edited — it claims" in capsys.readouterr().out


def test_replay_reruns_and_names_the_verdicts_that_differ(small_report, tmp_path, capsys):
    assert main(["replay", str(small_report), "--report-dir", str(tmp_path / "a")]) == 0
    (again,) = (tmp_path / "a").glob("*.json")
    assert report.load(again)["report_id"] == report.load(small_report)["report_id"]
    rep = json.loads(small_report.read_text())
    rep["results"][0]["status"] = "fail"
    rep["report_id"] = report.report_id(rep)  # an editor can recompute the id, not keep it
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(rep))
    capsys.readouterr()
    assert main(["replay", str(edited), "--report-dir", str(tmp_path / "b")]) == 1
    assert "softmax float64 forward: fail in the report, pass here" in capsys.readouterr().out


def test_report_id_does_not_depend_on_unrelated_installed_plugins(tmp_path):
    def run(extra_env: dict[str, str], d: Path) -> str:
        env = {**os.environ, "PYTHONPATH": str(TESTS), **extra_env}
        r = subprocess.run([sys.executable, "-m", "lmspec", "run", "--backend", "torch-cpu",
                            "--op", "logsumexp", "--dtype", "float32", "--max-examples", "5",
                            "--report-dir", str(d)], capture_output=True, text=True, env=env,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        (path,) = d.glob("*.json")
        return report.load(path)["report_id"]

    assert run({}, tmp_path / "a") == run({"LMSPEC_PLUGINS": "hostile_plugin"}, tmp_path / "b")


def test_the_environment_explains_last_digit_differences():
    env = report.environment()
    assert {"cpu", "cpu_flags", "numpy_simd", "blas", "env"} <= set(env)
    r = subprocess.run([sys.executable, "-c", "import sys\n"
                        "from lmspec.conformance.report import environment\n"
                        "environment()\nassert 'torch' not in sys.modules"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr  # the judge's environment never imports an engine


def test_a_declared_tf32_precision_is_judged_with_tf32_unit_roundoff():
    class Tf32Like(Softmax):
        """float32 softmax with a TF32-sized relative error (products rounded to 10 bits)."""

        def softmax(self, x, axis=-1):
            return (super().softmax(x, axis) * (1 + 2.0**-12)).astype(x.dtype)

    strict = Tf32Like()
    assert _run(strict, "float32")["status"] == "fail"
    tf32 = Tf32Like()
    tf32.precision = {"float32": "tf32"}
    res = _run(tf32, "float32")
    assert res["status"] == "pass" and res["precision"] == "tf32"
    assert res["tolerance"]["u"] == 2.0**-11
    assert _run(tf32, "float64")["status"] == "fail"  # only the declared dtype is relaxed


def test_a_property_that_never_calls_the_backend_checks_nothing(monkeypatch):
    from lmspec.conformance.declare import PROPERTIES, Holds, Property

    def decides_alone(run, drawn, dtype):
        yield Holds("decided without the backend", True)

    monkeypatch.setitem(PROPERTIES, ("softmax", "vacuous"),
                        Property("vacuous", "softmax", decides_alone))
    res = run_target(Softmax(), Target("knobs", "softmax", "float64", "vacuous"),
                     Settings(max_examples=10), {})
    assert res["status"] == "unsupported" and res["examples"] == 0
    assert res["message"] == "no example exercised the backend"


def test_every_example_of_a_check_is_a_fresh_draw(monkeypatch):
    """Hypothesis' span-copying mutator (up to five copies after each fresh example) is
    off while a check runs, and back afterwards for the process' own Hypothesis tests."""
    from hypothesis.internal.conjecture.engine import ConjectureRunner

    copies = []
    original = ConjectureRunner.generate_mutations_from

    def counting(self, data):
        before = self.call_count
        original(self, data)
        copies.append(self.call_count - before)

    monkeypatch.setattr(ConjectureRunner, "generate_mutations_from", counting)
    with harness.fresh_examples():
        assert _run(Softmax(), n=60)["examples"] == 60
    assert copies == []
    assert ConjectureRunner.generate_mutations_from is counting
    assert _run(Softmax(), n=60)["examples"] == 60
    assert copies == []  # run_target turns it off itself
    # the same search without the switch spends most of its examples on copies
    strategy = harness.CASES["softmax"].strategy("float64")

    from hypothesis import given, seed, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, database=None, deadline=None)
    @seed(0)
    @given(st.data())
    def search(data):
        data.draw(strategy)

    search()
    assert sum(copies) > 20
