"""The cross-engine scoreboard, from small synthetic reports (no conformance runs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmspec.conformance import markdown, report, scoreboard, tables
from lmspec.conformance.scoreboard import Footnotes, cell_text, scoreboard_markdown, worst


def _r(op: str = "softmax", dtype: str = "float32", check: str = "forward",
       status: str = "pass", backend: str = "b", ratio: float | str = 0.25, **kw) -> dict:
    return {"backend": backend, "op": op, "dtype": dtype, "check": check, "status": status,
            "examples": 10, "max_abs_err": 1e-7, "max_rel_err": 1e-6, "worst_ratio": ratio,
            "tolerance": None, "message": "", "counterexample": None, "reproduce": None,
            "unsupported_examples": 0} | kw


def _rep(results: list[dict], created: str = "2026-11-01T00:00:00+00:00", **kw) -> dict:
    names = list(dict.fromkeys(r["backend"] for r in results))
    rep = report.build(results, {"profile": "default", "max_examples": 10, "seed": 0,
                                 **kw.pop("settings", {})},
                       [{"name": n, "device": "cpu", "dtypes": ["float32"], "plugin": "t",
                         "version": "1", "status": "ok", "info": {"torch": "9.9"}}
                        for n in names], 1.0, **kw)
    rep["created"] = created  # a timing: not part of the id
    assert rep["report_id"] == report.report_id(rep)
    return rep


DEV = _r(status="deviation", ratio=3.0, deviation_reason="engine sums in float16 | overflows")
FAIL = _r(check="vjp", status="fail", ratio="inf", message="x" * 500,
          reproduce="lmspec run --backend b --op softmax")
PARTIAL = _r(check="vjp", examples=3, unsupported_examples=7, partial=True, ratio=0.5)
UNSUPPORTED = _r(check="vjp", status="unsupported", examples=0, ratio=0.0)


def test_a_pass_without_gradient_reads_pass_no_vjp_in_every_table():
    from lmspec.conformance import html, terminal

    rs = [_r(), _r(check="rows_sum_to_one"), UNSUPPORTED]
    assert tables.worst_label(rs) == "pass" and tables.cell(rs) == "pass; no vjp"
    assert tables.cell([_r(status="fail"), UNSUPPORTED]) == "FAIL (forward); no vjp"
    assert "pass; no vjp" in terminal.table(rs, 100)
    assert "pass; no vjp" in markdown.render(_rep(rs))
    assert "pass; no vjp" in html.render(_rep(rs))
    assert cell_text(rs, Footnotes()) == "pass 0.25; no vjp"


def test_terminal_table_wraps_between_words_only():
    from lmspec.conformance import terminal

    rs = [_r(status="fail", check=c) for c in ("forward", "a_property_name_longer_than_a_cell")]
    text = terminal.table(rs + [UNSUPPORTED], 60)
    assert "a_property_name_longer_than_a_cell" in text


def _row(md: str, op: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| `{op}`"))
    return [c.strip() for c in line.strip("|").split(" | ")]


@pytest.mark.parametrize(("results", "expected"), [
    ([_r(), _r(check="vjp")], "pass"),
    ([_r(), UNSUPPORTED], "pass"),
    ([UNSUPPORTED], "unsupported"),
    ([_r(), PARTIAL], "partial"),
    ([PARTIAL, DEV], "deviation"),
    ([DEV, FAIL], "fail"),
    ([FAIL, _r(check="jvp", status="error", ratio=0.0)], "error"),
    ([_r(status="skipped", ratio=0.0), UNSUPPORTED], "unsupported"),
])
def test_worst_verdict_by_severity(results, expected):
    assert worst(results) == expected


def test_cell_text_status_ratio_and_lesser_verdicts():
    notes = Footnotes()
    assert cell_text([_r(ratio=0.123456), _r(check="vjp", ratio=0.01)], notes) == "pass 0.123"
    assert cell_text([_r(), UNSUPPORTED], notes) == "pass 0.25; no vjp"
    assert cell_text([UNSUPPORTED], notes) == "unsupported"
    assert cell_text([_r(), PARTIAL], notes) == "partial pass (vjp) 0.5"
    assert cell_text([], notes) == "—"
    assert not notes.notes
    # the error's ratio (nothing judged) does not enter the maximum; the fail's inf does
    err = _r(check="jvp", status="error", ratio=99.0, message="boom")
    assert cell_text([DEV, FAIL, err], notes) == "ERROR (jvp) inf [1] [2] [3]; FAIL (vjp); " \
                                                 "deviation (forward)"


def test_footnotes_deduplicated_and_messages_cut():
    reps = [_rep([DEV, _r(dtype="float64", status="deviation",
                           deviation_reason=DEV["deviation_reason"]), FAIL])]
    md = scoreboard_markdown(reps)
    assert _row(md, "softmax")[1:] == ["FAIL (vjp) inf [1] [2]; deviation (forward)",
                                       "deviation 0.25 [1]"]
    notes = [x for x in md.splitlines() if re.match(r"\d+\. ", x)]
    assert notes[0] == "1. deviation (b): engine sums in float16 \\| overflows"
    assert notes[1].startswith("2. FAIL (b): xxx") and len(notes[1]) < 230
    assert len(notes) == 2


def test_open_findings_and_per_backend_counts():
    md = scoreboard_markdown([_rep([_r(), FAIL, _r(op="logsumexp", backend="c"),
                                    _r(op="logsumexp", backend="c", check="vjp",
                                       status="error", message="raised")])])
    findings = md.split("## Open findings")[1].split("## Per backend")[0]
    assert "**FAIL** b float32 `softmax` vjp, worst ratio inf [1]; replay: `lmspec run" in findings
    assert "**ERROR** c float32 `logsumexp` vjp [2]" in findings
    assert "- **b** (float32): 1 cells — 1 FAIL; 2 checks — 1 FAIL, 1 pass." in md
    assert "- **c** (float32): 1 cells — 1 ERROR; 2 checks — 1 ERROR, 1 pass." in md
    clean = scoreboard_markdown([_rep([_r()])])
    assert "None: no check failed or errored" in clean


def test_rows_in_catalogue_order_columns_grouped_by_backend():
    md = scoreboard_markdown([_rep([_r(op="logsumexp", dtype="float64", backend="z"),
                                    _r(op="softmax", dtype="float64", backend="a"),
                                    _r(op="softmax", dtype="float16", backend="z")])])
    header = next(x for x in md.splitlines() if x.startswith("| op"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == [
        "a float64", "z float16", "z float64"]
    assert md.index("| `softmax`") < md.index("| `logsumexp`") < md.index("| `rms_norm`")
    assert _row(md, "rms_norm")[1:] == ["—", "—", "—"]


def test_incomplete_and_sharded_reports_skipped():
    done = _rep([_r(ratio=0.1)], created="2026-11-01T00:00:00+00:00")
    stopped = _rep([_r(status="fail", message="later but stopped")], incomplete=True,
                   created="2026-11-05T00:00:00+00:00")
    shard = _rep([_r(status="fail", message="a shard")], settings={"shard": "1/2"},
                 created="2026-11-06T00:00:00+00:00")
    md = scoreboard_markdown([("old.json", done), ("stopped.json", stopped),
                              ("shard.json", shard)])
    assert _row(md, "softmax")[1] == "pass 0.1"
    assert "`stopped.json` (incomplete" in md and "`shard.json` (shard 1/2" in md
    assert "| `old.json`" in md and "| `stopped.json`" not in md


def test_newest_report_wins_per_backend_and_dtype():
    old = _rep([_r(status="fail", message="old kernel"), _r(dtype="float64", ratio=0.2)],
               created="2026-11-01T00:00:00+00:00")
    new = _rep([_r(ratio=0.3)], created="2026-11-02T09:00:00+01:00")
    older = _rep([_r(dtype="float64", ratio=0.9)], created="2026-10-01T00:00:00+00:00")
    md = scoreboard_markdown([("new.json", new), ("older.json", older), ("old.json", old)])
    assert _row(md, "softmax")[1:] == ["pass 0.3", "pass 0.2"]   # float32 new, float64 old
    assert "old kernel" not in md
    assert "`older.json` (superseded" in md
    used = md.split("## Reports")[1].split("## Results")[0]
    assert used.index("new.json") < used.index("old.json")
    assert "b (torch 9.9): float32" in used and "b (torch 9.9): float64" in used


def test_edited_report_is_marked():
    rep = _rep([_r()])
    rep["results"][0]["worst_ratio"] = 0.01
    assert "**EDITED**" in scoreboard_markdown([rep])
    assert "| intact" in scoreboard_markdown([_rep([_r()])])


def test_command_writes_the_page(tmp_path: Path, monkeypatch, capsys):
    d = tmp_path / "reports"
    d.mkdir()
    for name, rep in [("a.json", _rep([_r()])), ("b.json", _rep([DEV], incomplete=True))]:
        (d / name).write_text(json.dumps(rep))
    (d / "junk.json").write_text("{}")
    (d / "stray.json").write_text(json.dumps(_rep([FAIL])))  # a local run: not cited
    monkeypatch.chdir(tmp_path)
    assert scoreboard.main([]) == 2  # no list of cited reports
    (d / "CITED").write_text("# the reports the scoreboard cites\na.json\nb.json  # stopped\n"
                             "junk.json\n")
    assert scoreboard.main([]) == 0
    page = (d / "README.md").read_text()
    assert page == scoreboard_markdown([("reports/a.json", report.load(d / "a.json")),
                                        ("reports/b.json", report.load(d / "b.json"))])
    assert "`lmspec verify reports/a.json` says `intact`" in page
    assert "python -m lmspec.conformance.scoreboard -o reports/README.md" in page
    err = capsys.readouterr().err
    assert "skipped reports/junk.json" in err and "not used reports/b.json" in err
    assert "stray" not in page + err
    assert scoreboard.main([str(d / "a.json"), "-o", str(tmp_path / "x.md")]) == 0
    assert (tmp_path / "x.md").exists()
    assert scoreboard.main([str(d / "b.json"), "-o", str(tmp_path / "y.md")]) == 1
    assert not (tmp_path / "y.md").exists()
