"""Hostile backends cannot corrupt a verdict or lose a run (CONTRACT §3, issue: verdicts
you can cite). Every run here ends with a valid report that names the problem and keeps
torch-cpu's results from the same run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import lmspec
from lmspec.conformance import report
from lmspec.conformance.harness import Settings, Target, run_target

TESTS = Path(__file__).parent
HOSTILE = {  # behaviour -> (status, what the message must say)
    "raises": ("error", "raised RuntimeError: boom"),
    "wrong-shape": ("error", "should have shape"),
    "nan": ("fail", "NaN/inf positions must match"),
    "nested-list": ("error", "arrays, but should have 1"),
    "mutate-before": ("error", "modified its input x"),
    "mutate-after": ("error", "modified its input x"),
    "hang": ("error", "timed out after 3 s"),
    "hang-in-c": ("error", "timed out after 3 s"),
    "exit": ("error", "exited with status 7"),
    "segfault": ("error", "killed by SIGSEGV"),
    "keyboard-interrupt": ("error", "KeyboardInterrupt"),
    "system-exit": ("error", "SystemExit: 4"),
    "huge-message": ("error", "more characters cut"),
    "prints": ("pass", ""),
}


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")]), **extra}


def _lmspec(*args: str, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "lmspec", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout)


def _only_report(d: Path) -> dict:
    (path,) = d.glob("*.json")
    rep = report.load(path)
    assert rep["report_id"] == report.report_id(rep)
    return rep


@pytest.mark.slow
def test_hostile_backends_get_their_verdicts_and_the_run_survives(tmp_path):
    backends = [a for b in HOSTILE for a in ("--backend", f"hostile-{b}")]
    r = _lmspec("run", "--plugin", "hostile_plugin", "--backend", "torch-cpu", *backends,
                "--op", "softmax", "--dtype", "float64", "--check", "forward",
                "--max-examples", "5", "--timeout", "3", "--report-dir", str(tmp_path))
    assert r.returncode == 1, r.stderr
    assert "garbage" not in r.stdout  # a backend's prints never reach lmspec's output
    rep = _only_report(tmp_path)
    got = {x["backend"]: x for x in rep["results"]}
    assert got["torch-cpu"]["status"] == "pass"
    for behaviour, (status, says) in HOSTILE.items():
        res = got[f"hostile-{behaviour}"]
        assert res["status"] == status and says in res["message"], (behaviour, res["message"])
        assert len(res["message"]) < 2200
    assert "garbage" in got["hostile-prints"]["backend_output"]
    assert got["hostile-mutate-before"]["counterexample"] is not None
    assert (tmp_path / next(tmp_path.glob("*.json")).name).stat().st_size < 2_000_000
    assert not list(tmp_path.glob(".*journal*"))  # the journal goes once the report is written


def test_inputs_are_pristine_for_in_process_backends_too():
    class Zeroes:
        name, device, dtypes = "zeroes", "cpu", ("float64",)

        def softmax(self, x, axis=-1):
            x[...] = 0
            return np.full_like(x, 1.0 / x.shape[axis])

    res = run_target(Zeroes(), Target("zeroes", "softmax", "float64", "forward"),
                     Settings(max_examples=5), {})
    assert res["status"] == "error" and "modified its input x" in res["message"]


@pytest.mark.slow
def test_backends_listing_survives_hostile_plugins():
    r = _lmspec("backends", "--json", "--plugin", "hostile_plugin", "--timeout", "3",
                env=_env(HOSTILE_AT_IMPORT="print"))
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)  # nothing the plugin printed is mixed into the JSON
    status = [(x["name"], x["status"]) for x in rows]
    assert ("torch-cpu", "ok") in status
    assert any(n == "torch-cpu" and s == "failed to load: name 'torch-cpu' is taken by lmspec "
               "(built-in)" for n, s in status)
    assert any("bad-name\\n" in n and "must match" in s for n, s in status)
    assert dict(status)["hostile-hang-available"].startswith(
        "unavailable: available() timed out after 3 s")

    dead = _lmspec("backends", "--json", "--plugin", "hostile_plugin",
                   env=_env(HOSTILE_AT_IMPORT="exit"))
    rows = {x["name"]: x["status"] for x in json.loads(dead.stdout)}
    assert rows["torch-cpu"] == "ok"
    assert rows["hostile_plugin"] == "failed to load: the backend process exited with status 3"


@pytest.mark.slow
def test_a_squatter_sorting_first_cannot_take_a_builtin_name(tmp_path):
    info = tmp_path / "aaa_squatter-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: aaa-squatter\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[lmspec]\naaa = hostile_plugin\n")
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(TESTS)]))
    r = _lmspec("run", "--backend", "torch-cpu", "--op", "softmax", "--dtype", "float64",
                "--check", "forward", "--max-examples", "5", "--report-dir",
                str(tmp_path / "r"), env=env)
    assert r.returncode == 0, r.stderr
    rep = _only_report(tmp_path / "r")
    assert [b["plugin"] for b in rep["backends"]] == ["builtin (lmspec " + lmspec.__version__ + ")"]
    listed = _lmspec("backends", "--json", env=env)
    squat = [x for x in json.loads(listed.stdout) if x["plugin"].startswith("aaa ")]
    assert any(x["status"].endswith("is taken by lmspec (built-in)") for x in squat)


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_leaves_an_incomplete_report_with_every_finished_check(tmp_path, jobs, sig):
    # 100 examples: the run lasts far longer than it takes this poller to see four lines and
    # send the signal, even when a busy machine starves the poller (at 10 examples the whole
    # run could finish between two polls, and no check was left to be stopped)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmspec", "run", "--backend", "torch-cpu", "--op", "softmax",
         "--op", "log_softmax", "--op", "lstm", "--op", "gru", "--max-examples", "100",
         "--jobs", str(jobs),
         "--report-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=_env())
    deadline = time.monotonic() + 300
    journal: list[Path] = []
    while time.monotonic() < deadline:  # wait until a few checks are journalled
        journal = list(tmp_path.glob(".*.journal.jsonl"))
        if journal and len(journal[0].read_text().splitlines()) >= 4:
            break
        time.sleep(0.2)
    assert journal, "no journal appeared"
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
    rep = _only_report(tmp_path)
    assert rep["incomplete"] is True
    done = [x for x in rep["results"] if x["status"] in ("pass", "deviation")]
    assert len(done) >= 3
    skipped = [x for x in rep["results"] if x["status"] == "skipped"]
    assert skipped and all(x["message"].startswith("interrupted") for x in skipped)
    assert not [x for x in rep["results"] if x["status"] in ("fail", "error")]


@pytest.mark.slow
def test_a_signal_stops_a_replay_with_143_and_no_verdict_difference(tmp_path):
    """`lmspec replay` stopped by SIGTERM exits 143 like `run`, lists no difference, and
    leaves the replay's incomplete report."""
    first, again = tmp_path / "first", tmp_path / "again"
    done = subprocess.run(
        [sys.executable, "-m", "lmspec", "run", "--backend", "torch-cpu", "--op", "lstm",
         "--op", "gru", "--dtype", "float64", "--max-examples", "100", "--report-dir",
         str(first)], capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    (cited,) = first.glob("*.json")
    proc = subprocess.Popen([sys.executable, "-m", "lmspec", "replay", str(cited),
                             "--report-dir", str(again)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # the replay is under way: two checks journalled
        journal = list(again.glob(".*.journal.jsonl")) if again.exists() else []
        if journal and len(journal[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "differ" not in out
    rep = _only_report(again)
    assert rep["incomplete"] is True
    assert any(x["status"] == "skipped" for x in rep["results"])


@pytest.mark.parametrize("make", ["file", "under-a-file"])
def test_an_unusable_report_dir_is_refused_before_the_first_check(tmp_path, make):
    (tmp_path / "f").write_text("not a directory")
    target = tmp_path / "f" if make == "file" else tmp_path / "f" / "sub"
    t0 = time.monotonic()
    r = _lmspec("run", "--backend", "torch-cpu", "--report-dir", str(target))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "cannot write reports to --report-dir" in r.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_a_missing_report_dir_is_created_and_reports_are_readable(tmp_path):
    d = tmp_path / "new" / "deeper"
    r = _lmspec("run", "--backend", "torch-cpu", "--op", "softmax", "--dtype", "float64",
                "--max-examples", "3", "--report-dir", str(d))
    assert r.returncode == 0, r.stderr
    for p in d.iterdir():
        assert p.stat().st_mode & 0o044 == 0o044  # group and others can read it


def test_a_hang_in_available_does_not_block_a_run_that_does_not_select_it(tmp_path):
    t0 = time.monotonic()
    r = _lmspec("run", "--plugin", "hostile_plugin", "--backend", "hostile-prints", "--op",
                "softmax", "--dtype", "float64", "--max-examples", "3", "--report-dir",
                str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 120
