"""Reports that can be cited (issue 24): provenance, ``lmspec verify``'s consistency
checks, and a journal whose lines only the judge can write."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lmspec.conformance import provenance, report
from lmspec.conformance.cli import main
from lmspec.conformance.runner import Journal, read_journal


def _result(backend: str = "b", status: str = "pass", op: str = "softmax") -> dict:
    return {"backend": backend, "op": op, "dtype": "float64", "check": "forward",
            "status": status, "examples": 5, "max_abs_err": 0.0, "max_rel_err": 0.0,
            "worst_ratio": 0.0, "tolerance": None, "message": "", "counterexample": None,
            "reproduce": None}


def _write(tmp_path, results, edit=None) -> str:
    rep = report.build(results, {"profile": "default", "max_examples": 5, "seed": 0,
                                 "ops": ["softmax"], "dtypes": ["float64"], "checks": "all",
                                 "backends": ["b"]},
                       [{"name": "b", "device": "cpu", "dtypes": ["float64"], "plugin": "t",
                         "version": "1", "status": "ok"}], 1.0)
    src = SimpleNamespace(name="builtin", kind="entry point", distribution="lmspec",
                          version="")
    rep = provenance.stamp(rep, "bwrap", [src])
    if edit:
        edit(rep)
        rep["report_id"] = report.report_id(rep)  # whoever edits it can rehash it
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rep))
    return str(path)


def test_a_report_records_its_sandbox_and_the_hashes_of_the_code(tmp_path, capsys):
    path = _write(tmp_path, [_result()])
    rep = json.loads(open(path).read())
    prov = rep["environment"]["provenance"]
    assert rep["environment"]["sandbox"] == prov["sandbox"] == "bwrap"
    assert prov["lmspec"]["files_sha256"] == provenance.lmspec_hash()
    assert prov["plugins"][0]["distribution"] == "lmspec"
    assert prov["plugins"][0]["files_sha256"].startswith("sha256:")
    assert main(["verify", path]) == 0 and "intact" in capsys.readouterr().out


@pytest.mark.parametrize("edit, says", [
    (lambda r: r["results"].append(_result("someone-else")), "outside the selection"),
    (lambda r: r["results"][0].update(status="passed"), "unknown statuses"),
    (lambda r: r["results"].append(_result()), "more than one result"),
    (lambda r: r["summary"].update({"pass": 7}), "summary does not count"),
    (lambda r: r["environment"]["provenance"]["lmspec"].update(files_sha256="sha256:0"),
     "not the code that wrote it"),
])
def test_verify_finds_a_rehashed_report_inconsistent(tmp_path, capsys, edit, says):
    path = _write(tmp_path, [_result()], edit)
    assert main(["verify", path]) == 1
    assert says in capsys.readouterr().out


def test_journal_lines_written_by_anyone_else_are_dropped(tmp_path):
    targets = ["b::softmax::float64::forward", "x::softmax::float64::forward"]
    j = Journal(tmp_path, {"settings": {}, "backends": [], "targets": targets})
    j.write(_result())
    with open(j.path, "a") as f:  # what a backend with write access would append
        f.write(json.dumps(_result("x")) + "\n")
        f.write(json.dumps({**_result("x"), "mac": "0" * 64}) + "\n")
    j.close(remove=False)
    header, results = read_journal(j.path)
    assert header["dropped"] == 2 and [r["backend"] for r in results] == ["b"]
    rep = report.from_journal(j.path)
    assert rep["recovered"] is True and rep["journal_lines_dropped"] == 2
    assert [r["status"] for r in rep["results"]] == ["pass", "skipped"]
    assert rep["report_id"] == report.report_id(rep)
    j.key_path.unlink()
    with pytest.raises(ValueError, match="key of this journal is gone"):
        read_journal(j.path)
