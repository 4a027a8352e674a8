"""The suite catches realistic bugs in the n-gram models (mutation testing).

Each mutant is the torch backend with one step of one estimator replaced by a common
mistake; the conformance harness must report ``fail`` for ``ngram_log_prob``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import torch

from lmspec.backends.torch_ngram import F64, NgramModel


class AddKWithoutV(NgramModel):
    """Add-k denominator ``c(h) + k`` instead of ``c(h) + k·V``."""

    def add_k(self, s):
        return torch.log((s.c_hw.to(F64) + self.k) / (s.c_h.to(F64) + self.k))


class RawLowerKneserNey(NgramModel):
    """Kneser-Ney with raw counts at the lower orders (absolute discounting)."""

    def counts(self, m, method):
        return self.raw_counts(m) if method == "kneser_ney" else super().counts(m, method)


class WittenBellSwappedLambda(NgramModel):
    """Witten-Bell with ``λ = N1+(h·)/(c(h) + N1+(h·))`` (the two weights swapped)."""

    def wb_weights(self, s):
        log_lam, log_rest = super().wb_weights(s)
        return log_rest, log_lam


class WittenBellLambdaOverV(NgramModel):
    """Witten-Bell with ``λ = c(h)/(c(h) + V)`` (vocabulary size for ``N1+(h·)``)."""

    def wb_weights(self, s):
        lam = s.c_h.to(F64) / (s.c_h.to(F64) + self.V)
        return torch.log(lam), torch.log1p(-lam)


MUTANTS = {
    "add-k denominator without V": AddKWithoutV,
    "raw counts at lower Kneser-Ney orders": RawLowerKneserNey,
    "Witten-Bell weights swapped": WittenBellSwappedLambda,
    "Witten-Bell lambda with V": WittenBellLambdaOverV,
}


@pytest.mark.parametrize("name", list(MUTANTS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mutant_is_caught(run_mutant, name, dtype):
    results = run_mutant("ngram_log_prob", MUTANTS[name].log_prob, dtypes=(dtype,),
                         max_examples=100)
    failing = [r for r in results if r["status"] == "fail"]
    assert failing, f"{name} went unnoticed: {[(r['check'], r['status']) for r in results]}"
    assert all(r["op"] == "ngram_log_prob" for r in failing)
    assert any(r["check"] == "forward" for r in failing)
    assert failing[0]["counterexample"] is not None and failing[0]["reproduce"]


def test_mutants_really_differ_from_the_backend():
    """Each mutant changes the answer on an ordinary input (so a pass is not an accident of
    the mutant being equivalent)."""
    corpus = torch.tensor([0, 1, 2, 0, 1, 1, 2, 2, 0, 2, 1, 0, 0, 1])
    queries = torch.tensor([[0, 1], [1, 2], [2, 2], [1, 0]])
    method = {AddKWithoutV: "add_k", RawLowerKneserNey: "kneser_ney"}
    for cls in MUTANTS.values():
        m = method.get(cls, "witten_bell")
        good = NgramModel.log_prob(corpus, queries, 4, m, 0.5, 0.75).numpy()
        bad = cls.log_prob(corpus, queries, 4, m, 0.5, 0.75).numpy()
        assert not np.allclose(good, bad, rtol=0, atol=1e-6), cls.__name__
