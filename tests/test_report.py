"""The reports people read: Markdown, HTML, the comparison, and the terminal."""

from __future__ import annotations

import copy
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("torch")

import torch

from lmspec.conformance import html, markdown, report, tables, terminal
from lmspec.conformance.cli import main
from lmspec.conformance.harness import Settings, Target, run_target
from lmspec.conformance.harness import ratio_distribution as dist
from lmspec.conformance.tables import DIFF

from .conftest import MutantBackend


def _result(op: str = "softmax", dtype: str = "float64", check: str = "forward",
            status: str = "pass", **kw) -> dict:
    r = {"backend": "b", "op": op, "dtype": dtype, "check": check, "status": status,
         "examples": 10, "max_abs_err": 1e-17, "max_rel_err": "inf", "worst_ratio": 0.25,
         "tolerance": {"policy": "p", "at_worst": {"value": 4e-17, "k": 3, "output": "out"}},
         "message": "", "counterexample": None, "reproduce": None, "unsupported_examples": 0,
         "shrink_replays": 0, "ratio_distribution": dist([0.0, 1e-3, 0.25] * 3 + [0.1])}
    return r | kw


def _report(results: list[dict], **kw) -> dict:
    return report.build(results, {"profile": "default", "max_examples": 10, "seed": 0},
                        [{"name": "b", "device": "cpu", "dtypes": ["float64"], "plugin": "t",
                          "version": "1", "status": "ok"}], 1.0, **kw)


PARTIAL = _result(check="vjp", examples=3, unsupported_examples=7, partial=True,
                  message="partial pass: only 3 of 10 examples checked")
UNSUPPORTED = _result(check="rows_sum_to_one", status="unsupported", examples=0,
                      unsupported_examples=10, worst_ratio=0.0, ratio_distribution=None,
                      message="no float64 kernel")


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(text: str) -> _Tags:
    p = _Tags()
    p.feed(text)
    p.close()
    return p


def test_unsupported_and_partial_are_never_a_plain_pass():
    passed = _result()
    assert tables.cell([passed, UNSUPPORTED]) == "pass; unsupported (rows_sum_to_one)"
    assert tables.cell([passed, PARTIAL]) == "partial pass (vjp)"
    assert tables.cell([UNSUPPORTED]) == "unsupported"
    assert tables.cell([passed]) == "pass"
    assert tables.status_text(PARTIAL) == "partial pass (3 of 10 checked)"
    md = markdown.render(_report([passed, PARTIAL, UNSUPPORTED]))
    rows = {line.split("|")[4].strip(): line for line in md.splitlines()
            if line.startswith("| softmax ") and line.count("|") > 10}
    assert "partial pass (3 of 10 checked)" in rows["vjp"]
    assert "| unsupported " in rows["rows_sum_to_one"] and "| pass " not in rows[
        "rows_sum_to_one"]
    assert "| — " in rows["forward"]  # max_rel_err "inf": meaningless, shown as a dash
    assert "Conventions:" in md and "3 significant digits" in md
    assert "2 pass (1 partial)" in md


def test_a_backend_that_declines_every_example_is_unsupported():
    class Declines:
        name, device, dtypes = "declines", "cpu", ("float64",)

        def softmax(self, x, axis=-1):
            raise NotImplementedError("not on this engine")

    r = run_target(Declines(), Target("declines", "softmax", "float64", "forward"),
                   Settings(max_examples=5), {})
    assert r["status"] == "unsupported" and r["unsupported_examples"] == 5
    assert tables.cell([r]) == "unsupported"


def test_incomplete_report_says_so_at_the_top():
    rep = _report([_result()], incomplete=True)
    assert "Incomplete report" in markdown.render(rep).split("## Backends")[0]
    assert "Incomplete report" in html.render(rep).split("Results (op")[0]


def test_compare_marks_differences_and_sets_the_exit_status(tmp_path, capsys):
    a = _report([_result(), _result(dtype="float32")])
    b = copy.deepcopy(a)
    b["results"][1] = _result(dtype="float32", status="fail", message="out[0]=1, but should be 2")
    b["environment"]["torch"] = "9.9"
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert main(["compare", str(pa), str(pa)]) == 0
    assert DIFF not in capsys.readouterr().out
    assert main(["compare", str(pa), str(pb), "--markdown", "--html",
                 str(tmp_path / "c.html")]) == 1
    out = capsys.readouterr().out
    torch_row = next(line for line in out.splitlines() if "| torch " in line)
    assert torch_row.startswith(f"| {DIFF}")
    assert f"{DIFF} FAIL" in out and f"{DIFF} pass" in out
    assert "| softmax " in out and "1 (op, dtype) with differing verdicts" in out
    page = _parse((tmp_path / "c.html").read_text())
    # the torch row (field and both values) and the two float32 cells
    assert sum(1 for t, a in page.tags if t == "td" and a.get("class") == "diff") == 5


def test_failure_on_the_terminal_has_counterexample_and_tolerance():
    def off(x, axis=-1):
        return torch.softmax(x, dim=axis) + 1e-6 * (x.shape[axis] > 2)

    b = MutantBackend({"softmax": off})
    r = run_target(b, Target(b.name, "softmax", "float64", "forward"), Settings(max_examples=30),
                   {})
    assert r["status"] == "fail"
    out = io.StringIO()
    terminal.summary(_report([r]), [r], ["x.json"], stream=out)
    text = out.getvalue()
    assert "FAIL: mutant softmax float64 forward" in text
    assert "counterexample (shrunk):" in text and "    x = float64[" in text
    assert "  tolerance " in text and "replay: lmspec run" in text
    assert "\033[" not in text  # not a terminal: no colour


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_colour_and_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    results = [_result(), _result(check="vjp", status="fail", message="m"), UNSUPPORTED,
               dict(UNSUPPORTED, dtype="float32")]
    s = _Tty()
    p = terminal.Progress(4, s)
    for r in results:
        p(r)
    p.close()
    out = s.getvalue()
    assert "\033[" in out and "4/4" in out and "ETA" in out and "\r" in out
    assert out.count("2 checks unsupported") == 1  # folded: one line for the op
    assert "failing)" not in out
    monkeypatch.setenv("NO_COLOR", "1")
    s = _Tty()
    p = terminal.Progress(4, s)
    for r in results:
        p(r)
    p.close()
    assert "\033[3" not in s.getvalue() and "\033[0m" not in s.getvalue()
    out = io.StringIO()
    terminal.summary(_report(results), results, ["x"], stream=out)
    assert "\033[" not in out.getvalue()


def test_progress_without_a_terminal_is_one_line_per_check():
    s = io.StringIO()
    p = terminal.Progress(3, s)
    for r in (_result(), UNSUPPORTED, dict(UNSUPPORTED, dtype="float32")):
        p(r)
    p.close()
    lines = s.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in s.getvalue()
    assert lines[0].startswith("[1/3]") and "2 checks unsupported" in lines[1]
    assert terminal.plural(1, "check") == "1 check"


def test_summary_table_folds_to_the_width():
    results = [_result(dtype=d, backend=b) for b in ("backend-one", "backend-two")
               for d in ("float16", "bfloat16", "float32", "float64")]
    text = terminal.table(results, 60)
    assert max(len(line) for line in text.splitlines()) <= 60
    assert text.count("op ") >= 2  # split into tables, each with the op column


def test_html_report_matrix_and_one_plot_per_op_backend_dtype(tmp_path):
    results = [_result(), PARTIAL, UNSUPPORTED, _result(dtype="float32"),
               _result(op="log_softmax", status="fail", worst_ratio=3.5,
                       message="out[0]=1, but should be 2",
                       counterexample={"input": {"args": [{"array": list(range(50)),
                                                           "dtype": "float64",
                                                           "shape": [50]}],
                                                 "kwargs": {"axis": -1}}},
                       reproduce="lmspec run --backend b --op log_softmax")]
    text = html.render(_report(results))
    page = _parse(text)
    assert not any(a.get("src", "").startswith("http") or a.get("href", "").startswith("http")
                   for _, a in page.tags)  # self-contained
    tables = [a.get("class") for t, a in page.tags if t == "table"]
    assert "matrix" in tables
    svgs = [t for t, _ in page.tags if t == "svg"]
    assert len(svgs) == len(html.figures(_report(results))) == 3  # (op, backend, dtype)
    body = "".join(page.text)
    assert "partial pass" in body and "unsupported" in body
    assert "x = float64[50] [0, 1, 2" in body and "… (50 values)" in body
    assert "lmspec run --backend b --op log_softmax" in body


def test_run_writes_html_and_report_regenerates_it(tmp_path, capsys):
    d = tmp_path / "r"
    assert main(["run", "--backend", "torch-cpu", "--op", "softmax", "--dtype", "float64",
                 "--max-examples", "5", "--report-dir", str(d)]) == 0
    (j,) = d.glob("*.json")
    h, m = j.with_suffix(".html"), j.with_suffix(".md")
    assert h.exists() and m.exists() and (h.stat().st_mode & 0o777) == (j.stat().st_mode & 0o777)
    err = capsys.readouterr().err
    assert "checks on torch-cpu" in err
    first = h.read_text()
    h.unlink()
    m.unlink()
    assert main(["report", str(j), "--html"]) == 0
    assert h.read_text() == first and not m.exists()
    assert main(["report", str(j), "-o", str(tmp_path / "o")]) == 0
    assert {p.suffix for p in (tmp_path / "o").iterdir()} == {".html", ".md"}
    assert main(["report", str(tmp_path / "missing.json")]) == 2


def test_html_screenshot(tmp_path):
    """A real report rendered by a headless browser (skipped without chromium)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed")
    page = tmp_path / "r.html"
    page.write_text(html.render(_report([_result(), PARTIAL, UNSUPPORTED])))
    shot = tmp_path / "r.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 10_000
    assert Path(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_from_a_journal_left_by_a_dead_controller(tmp_path, capsys):
    from lmspec.conformance.runner import Journal

    targets = ["b::softmax::float64::forward", "b::softmax::float64::vjp"]
    j = Journal(tmp_path, {"settings": {"profile": "default", "max_examples": 10, "seed": 0},
                           "backends": [], "targets": targets})
    j.write(_result())
    j.close(remove=False)
    assert main(["report", "--journal", str(j.path)]) == 0
    (path,) = tmp_path.glob("*.json")
    rep = report.load(path)
    assert rep["incomplete"] and [r["status"] for r in rep["results"]] == ["pass", "skipped"]
    assert path.with_suffix(".html").exists() and path.with_suffix(".md").exists()
    assert main(["report"]) == 2 and "either REPORT.json or --journal" in capsys.readouterr().err


def test_ratio_quantiles_are_observed_ratios_even_next_to_an_infinite_one():
    """A deviating example can have ratio inf; interpolated quantiles became NaN there."""
    q = dist([0.0, 0.5, 2.0, float("inf")])["quantiles"]
    assert q == {"0.5": 0.5, "0.9": "inf", "0.99": "inf", "1": "inf"}
    assert dist([0.1, 0.3])["quantiles"] == {"0.5": 0.1, "0.9": 0.3, "0.99": 0.3, "1": 0.3}
