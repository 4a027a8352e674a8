"""Conformance inputs and properties of the ngram family (``ngram_log_prob``).

Inputs: vocabularies of 1 … 8 ids (1 and 2 often), corpora from empty to 150 tokens
(Zipf-like, uniform, a short pattern repeated, shorter than the order; the long Zipf
ones give modified Kneser-Ney counts-of-counts n1 … n4 > 0), orders 1 … 5,
queries mixing windows of the corpus (seen) with random rows (unseen contexts and
words), all five methods, several ``k`` and discounts in ``[0, 1]``.

Tolerance: outputs are log-probabilities, compared in absolute error. The backend's
error comes from ≈5 roundings per interpolation order in the probability (a relative
error of ``p`` is an absolute error of ``ln p``) plus the final ``ln``, so ``k = 5n + 2``
and ``M = max(1, max|ln p|)`` (the harness default).
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from lmspec.ngram import INTERPOLATED, METHODS

from . import draw as d
from .declare import Call, Close, Holds, cases, prop

OP = "ngram_log_prob"


def _zipf_token(vocab: int):
    """Ids with Zipf's law P(i) ∝ 1/(i+1) (approximately: weights rounded to 1/12ths)."""
    return st.sampled_from([i for i in range(vocab) for _ in range(max(1, round(12 / (i + 1))))])


@st.composite
def _corpus(draw, vocab: int, n: int) -> np.ndarray:
    kind = draw(st.sampled_from(["zipf", "long zipf", "uniform", "pattern", "shorter than n"]),
                label="corpus kind")
    if kind == "shorter than n":
        length = draw(st.integers(0, max(n - 1, 0)), label="N")
        return d.ints(draw, (length,), vocab, label="corpus")
    length = draw(st.integers(60, 150) if kind == "long zipf" else st.integers(1, 60),
                  label="N")
    if kind == "pattern":
        pattern = d.ints(draw, (draw(st.integers(1, 4), label="period"),), vocab, label="pattern")
        return np.resize(pattern, length).astype(np.int64)
    if kind == "uniform":
        return d.ints(draw, (length,), vocab, label="corpus")
    toks = draw(st.lists(_zipf_token(vocab), min_size=length, max_size=length), label="corpus")
    return np.asarray(toks, dtype=np.int64)


@st.composite
def _queries(draw, corpus: np.ndarray, vocab: int, n: int) -> np.ndarray:
    rows = draw(st.integers(1, 6), label="M")
    seen = len(corpus) - n + 1
    out = d.ints(draw, (rows, n), vocab, label="random queries")
    for j in range(rows):
        if seen > 0 and draw(st.booleans(), label=f"query {j} from corpus"):
            i = draw(st.integers(0, seen - 1), label=f"query {j} position")
            out[j] = corpus[i:i + n]
            if draw(st.booleans(), label=f"query {j} new word"):
                out[j, -1] = draw(st.integers(0, vocab - 1), label=f"query {j} word")
    return out


VOCAB = st.sampled_from([2, 3, 4, 5, 1, 2, 3, 6, 8])
K_VALUES = st.sampled_from([1.0, 0.5, 0.1, 0.01, 2.0, 0.0, 1e-6, 7.25])
DISCOUNTS = st.one_of(st.sampled_from([0.0, 0.1, 0.5, 0.75, 1.0]), st.floats(0.0, 1.0))


@st.composite
def ngram_call(draw, dtype: str, methods=METHODS, discounts=DISCOUNTS) -> Call:
    vocab = draw(VOCAB, label="vocab_size")
    n = draw(st.integers(1, 5), label="n")
    corpus = draw(_corpus(vocab, n))
    queries = draw(_queries(corpus, vocab, n))
    method = draw(st.sampled_from(list(methods)), label="method")
    kw = {"method": method, "k": draw(K_VALUES, label="k"),
          "discount": draw(discounts, label="discount")}
    return Call((corpus, queries, vocab), kw)


def _k(call: Call) -> int:
    return 5 * call.args[1].shape[1] + 2


def _scale(call: Call, cot: object = None) -> float:
    """M ≥ 1: the error is absolute in ln p (a relative error of p), even where ln p ≈ 0."""
    return 1.0


cases(OP, k=_k, scale=_scale)(ngram_call)


# -- properties that need no reference --------------------------------------------------

def _all_words(context: np.ndarray, vocab: int) -> np.ndarray:
    """``[V, n]``: the context followed by every word of the vocabulary."""
    return np.concatenate([np.tile(context, (vocab, 1)), np.arange(vocab)[:, None]], axis=1)


@prop(OP)
def sums_to_one(run, call: Call, dtype: str):
    """Σ_w P(w | h) = 1 over the vocabulary, for each query's context (mle, and add-k with
    k = 0: where the context is seen; an unseen one gives NaN (0/0) for every word)."""
    corpus, queries, vocab = call.args
    for h in np.unique(queries[:, :-1], axis=0):
        lp = run(OP, corpus, _all_words(h, vocab), vocab, **call.kwargs)
        undefined = call.kwargs["method"] == "mle" or call.kwargs["k"] == 0
        if undefined and np.isnan(lp).any():
            yield Holds("0/0: an unseen context is NaN for every word", bool(np.isnan(lp).all()),
                        f"log-probs {lp.tolist()}")
            continue
        yield Close("Σ_w exp(ln P(w|h)) = 1", np.sum(np.exp(lp)), 1.0,
                    k=vocab + _k(call), scale=max(1.0, math.log(vocab)))


@prop(OP, strategy=lambda dtype: ngram_call(dtype, methods=("add_k",)))
def add_k_large_k_is_uniform(run, call: Call, dtype: str):
    """As k → ∞, (c(h w) + k)/(c(h) + kV) → 1/V; at k = 2^70 the gap is below 10^-19."""
    corpus, queries, vocab = call.args
    lp = run(OP, corpus, queries, vocab, method="add_k", k=2.0**70)
    yield Close("ln P(w|h) = −ln V for huge k", lp, np.full(len(queries), -math.log(vocab)),
                k=_k(call))


@st.composite
def _unigram_and_permutation(draw, dtype: str):
    call = draw(ngram_call(dtype, methods=("add_k",)))
    corpus, queries, vocab = call.args
    perm = np.asarray(draw(st.permutations(range(len(corpus))), label="permutation"), np.int64)
    return call, corpus[perm]


@prop(OP, strategy=_unigram_and_permutation)
def order1_add_k_ignores_context(run, drawn, dtype: str):
    """An order-1 add-k model sees no context: it only depends on the unigram counts, so
    it is invariant under any reordering of the corpus."""
    call, shuffled = drawn
    corpus, queries, vocab = call.args
    last = queries[:, -1:]
    kw = {"method": "add_k", "k": call.kwargs["k"]}
    yield Close("order-1 add-k unchanged by shuffling the corpus",
                run(OP, shuffled, last, vocab, **kw), run(OP, corpus, last, vocab, **kw), k=7)


_POSITIVE = st.one_of(st.sampled_from([0.1, 0.5, 0.75, 1.0]), st.floats(1e-3, 1.0))


@prop(OP, strategy=lambda dtype: ngram_call(dtype, methods=("witten_bell", "kneser_ney"),
                                             discounts=_POSITIVE))
def interpolated_never_zero(run, call: Call, dtype: str):
    """Witten-Bell and Kneser-Ney (D > 0) give every word of the vocabulary a positive
    probability in every context, since the recursion ends in the uniform 1/V. (Modified
    Kneser-Ney too, whenever its estimated D1, D2, D3+ are positive.)"""
    corpus, queries, vocab = call.args
    assert call.kwargs["method"] in INTERPOLATED
    for h in np.unique(queries[:, :-1], axis=0):
        lp = run(OP, corpus, _all_words(h, vocab), vocab, **call.kwargs)
        yield Holds("ln P(w|h) > −inf for every w", bool(np.all(np.isfinite(lp))),
                    f"context {h.tolist()}: log-probs {lp.tolist()}")
