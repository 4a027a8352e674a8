"""Sharded runs merge into the report of the unsharded run (same results, same id)."""

from __future__ import annotations

import pytest

from lmspec.conformance import report
from lmspec.conformance.cli import main
from lmspec.conformance.cli_run import effective_jobs
from lmspec.conformance.harness import Target
from lmspec.conformance.shards import parse_shard, shard

SELECTION = ["run", "--backend", "torch-cpu", "--op", "softmax", "--op", "logsumexp",
             "--dtype", "float32", "--max-examples", "5"]


def _one(d):
    (p,) = d.glob("*.json")
    return report.load(p)


def test_shards_cover_the_selection_once():
    todo = [Target("b", f"op{i}", "float32", "forward") for i in range(23)]
    parts = [shard(todo, k, 4) for k in range(1, 5)]
    assert sorted(t.op for p in parts for t in p) == sorted(t.op for t in todo)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        parse_shard("5/4")
    with pytest.raises(ValueError):
        parse_shard("0/4")


@pytest.mark.slow
def test_merging_four_shards_gives_the_unsharded_report(tmp_path, capsys):
    assert main([*SELECTION, "--report-dir", str(tmp_path / "all")]) == 0
    for k in range(1, 5):
        assert main([*SELECTION, "--shard", f"{k}/4", "--report-dir", str(tmp_path / str(k))]) == 0
    shards = [str(next((tmp_path / str(k)).glob("*.json"))) for k in range(1, 5)]
    assert main(["merge", *shards, "-o", str(tmp_path / "merged")]) == 0
    whole, merged = _one(tmp_path / "all"), _one(tmp_path / "merged")
    assert merged["results"] == [dict(r, duration_s=m["duration_s"]) for r, m in zip(
        whole["results"], merged["results"])]
    assert merged["report_id"] == whole["report_id"]
    assert main(["merge", shards[0], str(next((tmp_path / "all").glob("*.json"))), "-o",
                 str(tmp_path / "m2")]) == 0  # overlapping parts that agree merge too


def test_merge_refuses_parts_of_different_runs(tmp_path, capsys):
    assert main([*SELECTION, "--shard", "1/2", "--report-dir", str(tmp_path / "a")]) == 0
    assert main([*SELECTION, "--shard", "2/2", "--seed", "1", "--report-dir",
                 str(tmp_path / "b")]) == 0
    a, b = (str(next((tmp_path / x).glob("*.json"))) for x in "ab")
    capsys.readouterr()
    assert main(["merge", a, b, "-o", str(tmp_path / "m")]) == 2
    assert "settings.seed" in capsys.readouterr().err


def test_parallelism_never_slows_a_small_run():
    assert effective_jobs(2, 16) == 1
    assert effective_jobs(2, 380) == 2
    assert effective_jobs(8, 60) == 2
