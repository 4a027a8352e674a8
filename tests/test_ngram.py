"""The ngram family: the exact reference against nltk.lm (an implementation nobody on
the project wrote) and worked examples, its two counting engines against each other,
exactness properties, input validation, and the torch backend against the reference.

Where nltk's conventions differ from the contract (see ``test_nltk_*``):
* vocabulary: nltk's ``len(vocab)`` always includes ``<UNK>``; we map id ``V−1`` to
  ``<UNK>`` and give nltk the other ``V−1`` words, so its V is ours (``V ≥ 2``);
* ``mle`` with an unseen context: nltk returns 0, the contract NaN (skipped);
* ``witten_bell``: nltk's unigram level is the plain MLE, the contract interpolates it
  with ``1/V``; the adapter below replaces only nltk's ``unigram_score`` (with nltk's own
  ``λ`` at the unigram level), the recursion and all higher orders are nltk's;
* ``kneser_ney``: nltk's unigram level is an undiscounted continuation MLE (raw counts
  for an order-1 model would be the contract's), again replaced by a ``unigram_score``
  adapter; nltk's ``γ`` uses the raw ``N1+(h·)`` at lower orders where the contract
  uses continuation counts, and it divides by zero when an n-gram occurs only at the
  corpus start. The two coincide when no lower-order n-gram occurs only at position 0,
  which we ensure by appending the corpus's first ``n−1`` tokens to its end;
* nltk has no modified Kneser-Ney; it is checked by hand-computed examples instead;
* nltk pads sentences with ``n−1`` ``</s>`` and counts them separately; we give it one
  unpadded "sentence", the flat corpus, so that its windows are ours.
nltk computes in float: for mle and add-k (dyadic ``k``) that is one correctly rounded
division of exact numbers, so it must agree with ``float(Fraction)`` to the last bit;
for Witten-Bell and Kneser-Ney its intermediate roundings allow a few ulps.
"""

from __future__ import annotations

import doctest
import math
import time
from fractions import Fraction

import numpy as np
import pytest

pytest.importorskip("torch")

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmspec
from lmspec import ngram
from lmspec.backends.torch_backend import TorchBackend
from lmspec.conformance.cases_ngram import ngram_call

METHODS = ngram.METHODS
CPU = TorchBackend("torch-cpu", "cpu", ("float32", "float64"))
HYP = settings(max_examples=150, deadline=None, database=None,
               suppress_health_check=list(HealthCheck))


def zipf_corpus(rng, n_tokens, vocab):
    p = 1.0 / np.arange(1, vocab + 1)
    return rng.choice(vocab, size=n_tokens, p=p / p.sum()).astype(np.int64)


def all_words(context, vocab):
    return np.array([[*context, w] for w in range(vocab)], dtype=np.int64).reshape(vocab, -1)


# -- worked examples (by hand, in the comments) ------------------------------------------

CORPUS = np.array([0, 1, 0, 2, 1, 1])  # bigrams 01 10 02 21 11, once each


def exact(method, queries, vocab=3, corpus=CORPUS, **kw):
    return ngram.ngram_prob_exact(corpus, np.array(queries), vocab, method, **kw)


def test_context_count_is_sum_over_same_order():
    # token 1 occurs 3 times, but the last one has no successor: c(1·) = c(10) + c(11) = 2
    assert exact("mle", [[1, 0], [1, 1], [1, 2]]) == [Fraction(1, 2), Fraction(1, 2), 0]
    assert exact("add_k", [[1, 0]], k=1.0) == [Fraction(2, 5)]  # (1 + 1)/(2 + 3)
    assert exact("mle", [[2, 2]], vocab=4, corpus=np.array([0, 1, 2])) == [None]  # c(2·) = 0


def test_witten_bell_by_hand():
    # unigram: λ = 6/(6+3) = 2/3, P1(w) = (2/3)·c(w)/6 + (1/3)/3 = (c(w)+1)/9 → 3/9 4/9 2/9
    assert exact("witten_bell", [[0], [1], [2]]) == [Fraction(3, 9), Fraction(4, 9),
                                                    Fraction(2, 9)]
    # context 0: c = 2, N1+ = 2, λ = 1/2: P(1|0) = ½·½ + ½·4/9 = 17/36
    assert exact("witten_bell", [[0, 1]]) == [Fraction(17, 36)]


def test_kneser_ney_by_hand():
    # continuation counts N1+(·w): w0 {1} → 1, w1 {0,2,1} → 3, w2 {0} → 1; total 5, N1+ = 3
    # with V = 4, context 3 is unseen and hands everything to the unigram level:
    # P1(w) = max(N1+(·w) − ½, 0)/5 + ½·3/5·¼ → 7/40, 23/40, 7/40, 3/40
    assert exact("kneser_ney", [[3, 0], [3, 1], [3, 2], [3, 3]], vocab=4, discount=0.5) == [
        Fraction(7, 40), Fraction(23, 40), Fraction(7, 40), Fraction(3, 40)]
    # with V = 3: P1 = 1/5, 3/5, 1/5 (raw unigram counts 2, 3, 1 would give others)
    # P(1|0) = (1 − ½)/2 + ½·2/2·P1(1) = ¼ + 3/10 = 11/20; P(0|0) = ½·P1(0) = 1/10
    assert exact("kneser_ney", [[0, 1], [0, 0], [0, 2]], discount=0.5) == [
        Fraction(11, 20), Fraction(1, 10), Fraction(7, 20)]
    # order 1 model: the highest order uses raw counts: (c(w) − ½)/6 + ½·3/6·⅓
    assert exact("kneser_ney", [[1]], discount=0.5) == [Fraction(5, 12) + Fraction(1, 12)]


def test_modified_kneser_ney_by_hand():
    # order 1, raw counts: ids 0-3 once, 4-5 twice, 6 three times, 7 four times, 8 never
    corpus = np.array([0, 1, 2, 3, 4, 4, 5, 5, 6, 6, 6, 7, 7, 7, 7])
    stats = ngram.ngram_stats(corpus, np.zeros((1, 1), np.int64), 9, "modified_kneser_ney")
    assert stats[1].coc == (4, 2, 1, 1)
    # Y = 4/(4+4) = ½; D1 = 1 − 2·½·2/4 = ½; D2 = 2 − 3·½·1/2 = 5/4; D3+ = 3 − 4·½·1 = 1
    assert ngram.mkn_discounts((4, 2, 1, 1)) == (Fraction(1, 2), Fraction(5, 4), Fraction(1))
    # γ = ½·4 + 5/4·2 + 1·2 = 13/2; P(w) = (c − D(c))/15 + (13/2)/15 · 1/9
    got = exact("modified_kneser_ney", [[7], [6], [4], [0], [8]], vocab=9, corpus=corpus)
    assert got == [Fraction(67, 270), Fraction(49, 270), Fraction(53, 540), Fraction(22, 270),
                   Fraction(13, 270)]
    assert sum(exact("modified_kneser_ney", [[w] for w in range(9)], vocab=9,
                     corpus=corpus)) == 1


def test_modified_kneser_ney_fallback():
    assert ngram.mkn_discounts((3, 0, 2, 3)) == ngram.MKN_FALLBACK  # n2 = 0
    # n = (2, 1, 3, 1): Y = ½, D2 = 2 − 3·½·3 = −5/2 < 0 → all three fall back
    assert ngram.mkn_discounts((2, 1, 3, 1)) == ngram.MKN_FALLBACK
    # n = (4, 2, 1, 3): D3+ = 3 − 4·½·3 = −3 → fallback although D1, D2 are fine
    assert ngram.mkn_discounts((4, 2, 1, 3)) == ngram.MKN_FALLBACK


def test_mkn_with_equal_discounts_is_kneser_ney(monkeypatch):
    """With D1 = D2 = D3+ = D the modified formula is exactly Kneser-Ney's."""
    rng = np.random.default_rng(3)
    corpus = zipf_corpus(rng, 80, 5)
    q = rng.integers(0, 5, (10, 3))
    want = exact("kneser_ney", q, vocab=5, corpus=corpus, discount=0.625)
    d = Fraction(0.625)
    monkeypatch.setattr(ngram, "mkn_discounts", lambda coc: (d, d, d))
    assert exact("modified_kneser_ney", q, vocab=5, corpus=corpus) == want


# -- nltk.lm (independent implementation) ---------------------------------------------------

def _nltk():
    lm = pytest.importorskip("nltk.lm")
    from nltk.lm import smoothing
    from nltk.lm.models import InterpolatedLanguageModel
    from nltk.util import everygrams

    gt0 = smoothing._count_values_gt_zero

    class WittenBellToUniform(smoothing.WittenBell):
        """nltk's Witten-Bell, unigram level interpolated with 1/V (nltk's own λ)."""

        def unigram_score(self, word):
            uni = self.counts.unigrams
            gamma = gt0(uni) / (gt0(uni) + uni.N())
            return (1.0 - gamma) * uni.freq(word) + gamma / len(self.vocab)

    class KneserNeyToUniform(smoothing.KneserNey):
        """nltk's Kneser-Ney, unigram level discounted and interpolated with 1/V."""

        def unigram_score(self, word):
            if self._order == 1:
                c_w, total, n_plus = self.counts.unigrams[word], self.counts.unigrams.N(), \
                    gt0(self.counts.unigrams)
            else:
                c_w, total = self._continuation_counts(word)
                n_plus = len({w for fd in self.counts[2].values() for w, c in fd.items() if c})
            d = self.discount
            return max(c_w - d, 0.0) / total + d * n_plus / total / len(self.vocab)

    def model(method, n, vocab, corpus, k=1.0, discount=0.75):
        voc = lm.Vocabulary([f"w{i}" for i in range(vocab - 1)], unk_cutoff=1)
        assert len(voc) == vocab
        if method == "mle":
            m = lm.MLE(n, vocabulary=voc)
        elif method == "add_k":
            m = lm.Lidstone(k, n, vocabulary=voc)
        elif method == "witten_bell":
            m = InterpolatedLanguageModel(WittenBellToUniform, n, vocabulary=voc)
        else:
            m = InterpolatedLanguageModel(KneserNeyToUniform, n, vocabulary=voc,
                                          params={"order": n, "discount": discount})
        m.fit([list(everygrams(words(corpus, vocab), max_len=n))])
        return m

    return model


def words(ids, vocab):
    return ["<UNK>" if i == vocab - 1 else f"w{i}" for i in np.asarray(ids).tolist()]


def _ulps(a, b):
    return abs(a - b) / math.ulp(max(abs(a), abs(b), 1e-300))


@st.composite
def nltk_case(draw):
    vocab = draw(st.integers(2, 6))
    n = draw(st.integers(1, 4))
    body = draw(st.lists(st.integers(0, vocab - 1), min_size=max(n - 1, 1), max_size=30))
    corpus = np.array(body + body[:n - 1], dtype=np.int64)  # every lower n-gram recurs
    seen = [corpus[i:i + n].tolist() for i in range(len(corpus) - n + 1)]
    rand = draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n),
                         min_size=1, max_size=4))
    queries = np.array(seen[:4] + rand, dtype=np.int64)
    return vocab, n, corpus, queries


@HYP
@given(nltk_case(), st.sampled_from([1.0, 0.5, 0.25, 2.0, 0.0078125]))
def test_nltk_mle_and_add_k_to_the_last_bit(case, k):
    model = _nltk()
    vocab, n, corpus, queries = case
    for method in ("mle", "add_k"):
        m = model(method, n, vocab, corpus, k=k)
        ours = ngram.ngram_prob_exact(corpus, queries, vocab, method, k=k)
        for row, p in zip(queries, ours, strict=True):
            if p is None:  # unseen context: nltk says 0, the contract NaN
                continue
            w = words(row, vocab)
            assert float(p) == m.score(w[-1], w[:-1]), (method, row)


@HYP
@given(nltk_case(), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 0.1]))
def test_nltk_witten_bell_and_kneser_ney(case, discount):
    model = _nltk()
    vocab, n, corpus, queries = case
    for method in ("witten_bell", "kneser_ney"):
        m = model(method, n, vocab, corpus, discount=discount)
        ours = ngram.ngram_prob_exact(corpus, queries, vocab, method, discount=discount)
        for row, p in zip(queries, ours, strict=True):
            w = words(row, vocab)
            assert _ulps(float(p), m.score(w[-1], w[:-1])) <= 4, (method, row)


# -- the two counting engines, exactness ------------------------------------------------------

@HYP
@given(ngram_call("float64"))
def test_engines_agree(call):
    corpus, queries, vocab = call.args
    kw = dict(call.kwargs)
    py = ngram.ngram_prob_exact(corpus, queries, vocab, **kw, engine="python")
    assert ngram.ngram_prob_exact(corpus, queries, vocab, **kw, engine="numpy") == py


@pytest.mark.parametrize("n", [1, 3, 5])
def test_engines_agree_on_a_longer_corpus(n):
    rng = np.random.default_rng(n)
    corpus = zipf_corpus(rng, 5000, 30)
    q = np.concatenate([corpus[100:100 + 20 * n].reshape(20, n), rng.integers(0, 30, (20, n))])
    for method in METHODS:
        assert (ngram.ngram_prob_exact(corpus, q, 30, method, 0.3, 0.6, engine="python")
                == ngram.ngram_prob_exact(corpus, q, 30, method, 0.3, 0.6, engine="numpy"))


@HYP
@given(ngram_call("float64"))
def test_every_distribution_sums_to_exactly_one(call):
    corpus, queries, vocab = call.args
    for h in np.unique(queries[:, :-1], axis=0):
        p = ngram.ngram_prob_exact(corpus, all_words(h, vocab), vocab, **call.kwargs)
        if None in p:  # mle / add-0 with an unseen context: undefined everywhere
            assert all(x is None for x in p)
            continue
        assert sum(p) == 1
        assert all(x >= 0 for x in p)
        if call.kwargs["method"] in ("witten_bell",) or (
                call.kwargs["method"] == "kneser_ney" and call.kwargs["discount"] > 0):
            assert all(x > 0 for x in p)  # interpolated models never give zero


def test_add_k_tends_to_uniform_and_order_one_ignores_context():
    rng = np.random.default_rng(0)
    corpus = zipf_corpus(rng, 50, 6)
    q = rng.integers(0, 6, (8, 3))
    gaps = [max(abs(p - Fraction(1, 6)) for p in exact("add_k", q, 6, corpus, k=k))
            for k in (1.0, 2.0**10, 2.0**20, 2.0**40)]
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False)) and gaps[-1] < 1e-10
    shuffled = rng.permutation(corpus)
    assert exact("add_k", q[:, -1:], 6, corpus, k=0.5) == exact("add_k", q[:, -1:], 6,
                                                                shuffled, k=0.5)


# -- ln of a Fraction, dtype ------------------------------------------------------------------

@pytest.mark.parametrize("p", [Fraction(1, 3), Fraction(2, 3), Fraction(10**20 - 1, 10**20),
                               Fraction(1, 10**400), Fraction(7, 2**1074 * 3), Fraction(1),
                               Fraction(1, 2), Fraction(3, 5), Fraction(12345, 10**9)])
def test_ln_fraction_is_accurate(p):
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(80):
        want = float(mpmath.log(mpmath.mpf(p.numerator) / p.denominator))
    assert _ulps(ngram.ln_fraction(p), want) <= 1


def test_special_values_and_dtype():
    lp = lmspec.ngram_log_prob(CORPUS, np.array([[1, 2], [2, 2]]), 4, "mle")
    assert lp[0] == -np.inf and np.isnan(lmspec.ngram_log_prob(
        np.array([0, 1]), np.array([[1, 1]]), 2, "mle"))[0]
    for dt in lmspec.DTYPES:
        out = lmspec.ngram_log_prob(CORPUS, np.array([[0, 1]]), 3, "kneser_ney", discount=0.5,
                                    dtype=dt)
        assert out.dtype == lmspec.DTYPES[dt]
        assert out[0] == np.float64(ngram.ln_fraction(Fraction(11, 20))).astype(out.dtype)
    assert lmspec.ngram_log_prob(np.zeros(0, np.int64), np.zeros((0, 2), np.int64), 3).shape == (0,)


def test_pad_sentences_and_docstring_example():
    assert ngram.pad_sentences([[5], [6, 7]], n=3, bos=0, eos=1).tolist() == [
        0, 0, 5, 1, 0, 0, 6, 7, 1]
    assert ngram.pad_sentences([], 2, 0, 1).shape == (0,)
    result = doctest.testmod(ngram, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# -- validation ----------------------------------------------------------------------------

BAD = [
    (dict(method="good_turing"), "method"),
    (dict(discount=1.5), "discount"),
    (dict(discount=-0.1), "discount"),
    (dict(k=-1.0), "'k'"),
    (dict(k=math.inf), "'k'"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(vocab_size=2), "corpus"),  # corpus holds id 2
    (dict(corpus=np.array([[0, 1]])), "corpus"),
    (dict(corpus=np.array([0.0, 1.0])), "corpus"),
    (dict(queries=np.array([0, 1])), "queries"),
    (dict(queries=np.zeros((2, 0), np.int64)), "queries"),
    (dict(queries=np.array([[0, 3]])), "queries"),
    (dict(dtype="float8"), "dtype"),
]


@pytest.mark.parametrize("change,name", BAD)
def test_bad_input_raises(change, name):
    args = dict(corpus=CORPUS, queries=np.array([[0, 1]]), vocab_size=3)
    args.update(change)
    with pytest.raises(ValueError, match=f"ngram_log_prob: argument .*{name}"):
        lmspec.ngram_log_prob(**args)


# -- the torch backend against the reference --------------------------------------------------

def _close(got, ref, atol):
    assert got.shape == ref.shape
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    assert np.array_equal(np.isinf(got), np.isinf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=0, atol=atol)


@HYP
@given(ngram_call("float64"), st.sampled_from(["float32", "float64"]))
def test_torch_backend_matches_reference(call, dtype):
    ref = lmspec.ngram_log_prob(*call.args, **call.kwargs, dtype=dtype)
    got = CPU.ngram_log_prob(*call.args, **call.kwargs, dtype=dtype)
    assert got.dtype == ref.dtype
    u = np.finfo(ref.dtype).eps / 2
    _close(got.astype(np.float64), ref.astype(np.float64),
           atol=64 * 2.0**-53 + 2 * u * max(1.0, np.max(np.abs(ref[np.isfinite(ref)]),
                                                       initial=0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_torch_cuda_matches_reference():
    cuda = TorchBackend("torch-cuda", "cuda:0", ("float32", "float64"))
    rng = np.random.default_rng(5)
    corpus = zipf_corpus(rng, 20000, 50)
    q = np.concatenate([corpus[:300].reshape(100, 3), rng.integers(0, 50, (100, 3))])
    for method in METHODS:
        _close(cuda.ngram_log_prob(corpus, q, 50, method, 0.5, 0.7),
               lmspec.ngram_log_prob(corpus, q, 50, method, 0.5, 0.7), 64 * 2.0**-53)


def test_large_corpus_fast_path_and_torch():
    """200k tokens: the reference counts with NumPy (no Python loop over tokens) and
    agrees with the torch backend."""
    rng = np.random.default_rng(7)
    corpus = zipf_corpus(rng, 200_000, 1000)
    q = np.concatenate([corpus[5000:5300].reshape(100, 3), rng.integers(0, 1000, (100, 3))])
    for method in METHODS:
        t0 = time.perf_counter()
        ref = lmspec.ngram_log_prob(corpus, q, 1000, method, 0.1, 0.75)
        assert time.perf_counter() - t0 < 20
        _close(CPU.ngram_log_prob(corpus, q, 1000, method, 0.1, 0.75), ref, 64 * 2.0**-53)
