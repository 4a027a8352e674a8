"""The pluggy registry: plugin objects, broken plugins, entry points, lazy torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lmspec
from lmspec.backends.registry import Registry

TESTS = Path(__file__).parent


class Good:
    name, device, dtypes = "good", "cpu", ("float64",)

    def softmax(self, x, axis=-1):
        return lmspec.softmax(x, axis)


def plugin(*backends, raise_in_hook=None):
    class P:
        @lmspec.hookimpl
        def register_backends(self, register):
            for b in backends:
                register(b)
            if raise_in_hook:
                raise raise_in_hook

    return P()


def test_plugin_object_registers_backends():
    reg = Registry()
    reg.add(plugin(Good()))
    (e,) = reg.all()
    assert e.ok and e.name == "good" and e.dtypes == ("float64",) and e.plugin.source == "object"


def test_broken_plugins_are_recorded_and_others_still_work():
    reg = Registry()
    reg.add(plugin(raise_in_hook=RuntimeError("boom")))
    reg.load_module("lmspec_no_such_module", "--plugin")
    reg.add(object())  # no hook at all

    class BadName(Good):
        name = "Bad Name"

    class BadDtypes(Good):
        name, dtypes = "bad-dtypes", ("float8",)

    class Unavailable(Good):
        name = "away"

        def available(self):
            raise OSError("driver exploded")

    reg.add(plugin(BadName(), BadDtypes(), Good(), Good(), Unavailable()))
    entries = reg.all()
    status = {e.name: e.status for e in entries if e.name != "good"}
    assert [e.status for e in entries if e.name == "good"][0] == "ok"
    assert "failed to load: RuntimeError: boom" in [s.split(" (")[0] for s in status.values()]
    assert status["lmspec_no_such_module"].startswith("failed to load: ModuleNotFoundError")
    assert any("no register_backends hook" in s for s in status.values())
    assert any("must match [a-z0-9]" in s for s in status.values())
    assert any("backend.dtypes must be" in s for s in status.values())
    assert [e.status for e in entries if e.name == "good"][1].endswith("already registered")
    assert status["away"].startswith("unavailable: available() raised OSError: driver exploded")
    assert [e.name for e in reg.available()] == ["good"]


def test_builtin_backends_come_from_the_entry_point():
    reg = Registry.default()
    cpu, cuda = reg.get("torch-cpu"), reg.get("torch-cuda")
    assert cpu.ok and cpu.plugin.source == "entry point" and cpu.plugin.distribution == "lmspec"
    assert cuda.status.startswith(("ok", "unavailable: no CUDA device"))


def _run(code_or_args, env=None, **kw):
    cmd = code_or_args if isinstance(code_or_args, list) else [sys.executable, "-c", code_or_args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=600, **kw)


def test_importing_lmspec_and_plugins_does_not_import_torch():
    r = _run("import sys, lmspec, lmspec.backends.builtin\n"
             "from lmspec.backends.registry import Registry\n"
             "reg = Registry.default()\n"
             "assert 'torch' not in sys.modules, 'torch imported'\n"
             "print([e.name for e in reg.entries])")
    assert r.returncode == 0, r.stderr
    assert "torch-cpu" in r.stdout


@pytest.fixture(scope="module")
def outsider_site(tmp_path_factory):
    """The outsider package made discoverable through a real dist-info entry point."""
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(TESTS / "outsider" / "lmspec_outsider", site / "lmspec_outsider")
    info = site / "lmspec_outsider-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmspec-outsider\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(
        "[lmspec]\noutsider = lmspec_outsider\noutsider-buggy = lmspec_outsider.buggy\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), str(TESTS)])}


def _lmspec(*args, env=None, cwd=None):
    return _run([sys.executable, "-m", "lmspec", *args], env=env, cwd=cwd)


def test_outsider_entry_point_is_listed_and_broken_plugin_shown(outsider_site):
    env = {**outsider_site, "LMSPEC_PLUGINS": "broken_plugin"}
    r = _lmspec("backends", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = {b["name"]: b for b in json.loads(r.stdout)}
    assert rows["torch-cpu"]["status"] == "ok"
    assert rows["torch-cuda"]["status"] in ("ok", "unavailable: no CUDA device")
    assert rows["outsider-numpy"]["status"] == "ok"
    assert rows["outsider-numpy"]["plugin"] == "outsider (lmspec-outsider 0.0.1)"
    assert rows["broken_plugin"]["status"].startswith(
        "failed to load: RuntimeError: this plugin is broken on purpose")


def test_outsider_backend_runs_and_its_bugs_fail(outsider_site, tmp_path):
    env = {**outsider_site, "LMSPEC_PLUGINS": "broken_plugin"}
    common = ["--op", "softmax", "--op", "cross_entropy", "--profile", "quick",
              "--report-dir", str(tmp_path)]
    good = _lmspec("run", "--backend", "outsider-numpy", *common, env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = _lmspec("run", "--backend", "outsider-buggy", *common, env=env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    (path,) = [p for p in tmp_path.glob("*.json")
               if json.loads(p.read_text())["settings"]["backends"] == ["outsider-buggy"]]
    report = json.loads(path.read_text())
    failed = {(r["op"], r["check"]) for r in report["results"] if r["status"] == "fail"}
    assert ("softmax", "forward") in failed and ("cross_entropy", "forward") in failed
    replay = next(r["reproduce"] for r in report["results"] if r["status"] == "fail")
    assert replay.startswith("lmspec run --backend outsider-buggy --op ")
