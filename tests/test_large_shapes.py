"""The large-shape tier (``lmspec run --shapes large``): lengths and widths that straddle
kernel tile sizes, which the small shapes of the ordinary strategies never reach."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from lmspec.backends import torch_attention as ta
from lmspec.conformance import report
from lmspec.conformance.cli import main
from lmspec.conformance.declare import CASES
from lmspec.conformance.harness import Settings, Target, run_target

from .conftest import MutantBackend

BLOCK = 128
LARGE_OPS = ("scaled_dot_product_attention", "multi_head_attention", "grouped_query_attention",
             "layer_norm", "rms_norm", "softmax", "log_softmax", "logsumexp", "cross_entropy",
             "fused_linear_cross_entropy")


def test_the_tiled_ops_declare_large_cases():
    assert all(CASES[op].large is not None for op in LARGE_OPS)


@pytest.mark.parametrize(("profile", "max_examples", "want"), [
    ("quick", None, 3), ("default", None, 5), ("thorough", None, 50), ("default", 2, 2)])
def test_large_tier_examples(profile, max_examples, want):
    assert Settings(profile, max_examples, shapes="large").examples == want
    assert Settings(profile, 7).examples == 7


@pytest.mark.slow
def test_large_tier_runs_through_the_cli(tmp_path, capsys):
    code = main(["run", "--backend", "torch-cpu", "--shapes", "large", "--dtype", "float32",
                 "--op", "scaled_dot_product_attention", "--op", "layer_norm",
                 "--op", "cross_entropy", "--max-examples", "2",
                 "--report-dir", str(tmp_path)])
    capsys.readouterr()
    (path,) = sorted(tmp_path.glob("*.json"))
    rep = report.load(path)
    assert code == 0, [r["message"] for r in rep["results"] if r["status"] != "pass"]
    assert rep["settings"]["shapes"] == "large" and rep["settings"]["max_examples"] == 2
    by_check = {(r["op"], r["check"]): r for r in rep["results"]}
    for op in ("scaled_dot_product_attention", "layer_norm", "cross_entropy"):
        for check in ("forward", "vjp"):
            r = by_check[(op, check)]
            assert r["status"] == "pass" and r["examples"] == 2, r
    props = [r for r in rep["results"] if r["check"] not in ("forward", "vjp")]
    assert props and all(r["status"] == "skipped" and r["message"] ==
                         "no large-shape cases for this check" for r in props)


def test_small_tier_reports_keep_their_settings(tmp_path, capsys):
    assert main(["run", "--backend", "torch-cpu", "--dtype", "float64", "--op", "softmax",
                 "--check", "forward", "--max-examples", "2", "--report-dir",
                 str(tmp_path)]) == 0
    capsys.readouterr()
    (path,) = sorted(tmp_path.glob("*.json"))
    assert "shapes" not in report.load(path)["settings"]


def test_an_op_without_large_cases_is_skipped():
    b = MutantBackend({})
    r = run_target(b, Target(b.name, "perplexity", "float32", "forward"),
                   Settings(max_examples=2, shapes="large"), {})
    assert r["status"] == "skipped"
    assert r["message"] == "no large-shape cases declared for perplexity"


def _sdpa_drops_late_keys(q, k, v, mask=None, is_causal=False, scale=None):
    """SDPA that only reads the first block of 128 keys (a kernel whose loop over key
    blocks stops after one)."""
    if k.shape[-2] > BLOCK:
        k, v = k[..., :BLOCK, :], v[..., :BLOCK, :]
        mask = None if mask is None else mask[..., :BLOCK]
    return ta.scaled_dot_product_attention(q, k, v, mask, is_causal, scale)


def test_a_bug_past_128_keys_is_caught_by_the_large_tier_only():
    b = MutantBackend({"scaled_dot_product_attention": _sdpa_drops_late_keys})
    target = Target(b.name, "scaled_dot_product_attention", "float32", "forward")
    small = run_target(b, target, Settings(max_examples=50), {})
    assert small["status"] == "pass", small["message"]
    large = run_target(b, target, Settings(max_examples=3, shapes="large"), {})
    assert large["status"] == "fail", large["message"]
    assert large["reproduce"].endswith("--shapes large")
    assert large["counterexample"]["input"]["args"][1]["shape"][-2] > BLOCK
