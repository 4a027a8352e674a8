"""The suite catches realistic one-line bugs in the core family (mutation testing)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch
import torch.nn.functional as F


def softmax_no_max_shift(x, axis=-1):
    e = torch.exp(x)
    return e / e.sum(dim=axis, keepdim=True)


def log_softmax_naive(x, axis=-1):
    return torch.log(torch.softmax(x, dim=axis))


def logsumexp_no_shift(x, axis=-1):
    return torch.log(torch.exp(x).sum(dim=axis))


def ce_mean_over_all_rows(logits, targets, ignore_index=-100, label_smoothing=0.0):
    per_row = F.cross_entropy(logits, targets, ignore_index=ignore_index,
                              label_smoothing=label_smoothing, reduction="none")
    return per_row.sum() / len(targets)


def ce_smoothing_over_other_classes(logits, targets, ignore_index=-100, label_smoothing=0.0):
    lp = torch.log_softmax(logits, dim=-1)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    nll = -lp.gather(1, safe[:, None])[:, 0]
    others = -(lp.sum(1) + nll) / max(logits.shape[1] - 1, 1)  # ε spread over V-1 classes
    row = (1 - label_smoothing) * nll + label_smoothing * others
    return torch.where(keep, row, torch.zeros_like(row)).sum() / keep.sum()


def slp_ignores_mask(log_probs, tokens, mask=None):
    return -F.nll_loss(log_probs.transpose(1, 2), tokens, reduction="none").sum(1)


def ppl_log2(log_probs, tokens, mask=None):
    """Treats the mean negative log-likelihood in nats as if it were in bits."""
    if mask is not None:
        tokens = torch.where(mask, tokens, torch.full_like(tokens, -100))
    return torch.exp2(F.nll_loss(log_probs.transpose(1, 2), tokens))


def ppl_mean_over_all_positions(log_probs, tokens, mask=None):
    picked = -F.nll_loss(log_probs.transpose(1, 2), tokens, reduction="none")
    if mask is not None:
        picked = torch.where(mask, picked, torch.zeros_like(picked))
    return torch.exp(-picked.mean())


MUTANTS = {
    "softmax without max subtraction": ("softmax", softmax_no_max_shift),
    "log of softmax": ("log_softmax", log_softmax_naive),
    "logsumexp without shift": ("logsumexp", logsumexp_no_shift),
    "cross-entropy averaging over ignored rows": ("cross_entropy", ce_mean_over_all_rows),
    "label smoothing over V-1 classes": ("cross_entropy", ce_smoothing_over_other_classes),
    "sequence_log_prob ignoring the mask": ("sequence_log_prob", slp_ignores_mask),
    "perplexity in base 2": ("perplexity", ppl_log2),
    "perplexity averaging over masked positions": ("perplexity", ppl_mean_over_all_positions),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(run_mutant, name):
    op, fn = MUTANTS[name]
    results = run_mutant(op, fn, dtypes=("float32",), max_examples=60)
    failing = [r for r in results if r["status"] == "fail"]
    assert failing, f"{name} went unnoticed: {[(r['check'], r['status']) for r in results]}"
    assert all(r["op"] == op for r in failing)
    assert failing[0]["counterexample"] is not None and failing[0]["reproduce"]
