"""ngram family: smoothed n-gram language models, exactly.

An order-``n`` model predicts ``w`` from the ``n−1`` preceding tokens ``h`` (the Markov
assumption of the seeds' n-gram notes). Everything is estimated from the counts of
every contiguous window of the training corpus (CONTRACT §2):

* ``c(g)``           raw count of the m-gram ``g`` (windows of length ``m``);
* ``c(h) = Σ_w c(h w)``  count of a context, always summed over n-grams of the *same*
  order (so it is not the count of ``h`` as a window: a window at the very end of the
  corpus has no successor and does not count), hence every distribution sums to 1;
* ``N1+(·g) = |{v : c(v g) > 0}|``  continuation count (distinct left neighbours);
* ``N_r(h·) = |{w : c(h w) = r}|``, ``N3+(h·)``, ``N1+(h·) = |{w : c(h w) > 0}|``;
* ``n_r = |{g of order m : c(g) = r}|``  counts-of-counts of order ``m``.

Methods (``V`` = ``vocab_size``, ``h'`` = ``h`` without its first token):

* ``mle``: ``P(w|h) = c(h w)/c(h)``; ``−inf`` where ``c(h w) = 0``, NaN where ``c(h) = 0``.
* ``add_k`` (Lidstone 1920; Laplace for ``k = 1``): ``(c(h w) + k)/(c(h) + k·V)``.
* ``witten_bell`` (Witten & Bell 1991, interpolated as in Chen & Goodman 1998 §2.5):
  ``P(w|h) = λ(h)·c(h w)/c(h) + (1 − λ(h))·P(w|h')``, ``λ(h) = c(h)/(c(h) + N1+(h·))``,
  raw counts at every order; the unigram level interpolates with the uniform ``1/V``.
* ``kneser_ney`` (Kneser & Ney 1995; interpolated form of Chen & Goodman 1998 §2.7):
  ``P(w|h) = max(c(h w) − D, 0)/c(h) + D·N1+(h·)/c(h) · P(w|h')``, ``D ∈ [0, 1]``.
  The highest order uses raw counts; every lower order ``m < n`` replaces *every* count in
  the formula by the continuation count: ``c(h w) → N1+(·h w)``,
  ``c(h) → Σ_w N1+(·h w)``, ``N1+(h·) → |{w : N1+(·h w) > 0}|``. The recursion ends in
  ``P(w) = 1/V``.
* ``modified_kneser_ney`` (Chen & Goodman 1998 §3, eq. 17–19): as Kneser-Ney with a
  discount depending on the count, ``D(0) = 0, D(1) = D1, D(2) = D2, D(c ≥ 3) = D3+``;
  the lower-order weight becomes ``(D1·N1(h·) + D2·N2(h·) + D3+·N3+(h·))/c(h)``. Per order
  ``m``, from the counts-of-counts ``n_r`` of the counts that order uses (raw at ``n``,
  continuation below): ``Y = n1/(n1 + 2 n2)``, ``D_r = r − (r + 1)·Y·n_{r+1}/n_r``. At an
  order where any of ``n1 … n4`` is 0, or some ``D_r`` lies outside ``[0, r]``, all three
  fall back to ``(D1, D2, D3+) = (1/2, 1, 3/2)``.

In the interpolated methods a context with ``c(h) = 0`` (counted as that order counts)
hands all of its mass to the next lower order: ``P(w|h) = P(w|h')``.

Exactness: counts are integers and probabilities :class:`fractions.Fraction`; ``k`` and
the discount enter as ``Fraction(float)`` (their exact binary values), so the reference
makes no rounding at all until the single final ``ln`` (:func:`ln_fraction`). Counting
is done by one of two engines giving the same integers: a readable pure-Python one
(``collections.Counter`` over tuples) and a vectorised NumPy one (``np.unique`` over
packed integer keys) that the op uses for corpora of ``FAST_MIN_TOKENS`` tokens or
more. Only the counts the queries need ever become Python integers/Fractions.

Sources: seeds 000–002 (n-gram models, MLE, add-one smoothing, perplexity);
Chen & Goodman, *An Empirical Study of Smoothing Techniques for Language Modeling*
(TR-10-98, 1998); Kneser & Ney, *Improved backing-off for m-gram language modeling*
(ICASSP 1995); Witten & Bell, *The zero-frequency problem* (IEEE Trans. Inf. Theory 1991).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from . import _validate as v
from ._catalogue import reference
from ._precision import DTYPES

OP = "ngram_log_prob"
METHODS = ("mle", "add_k", "witten_bell", "kneser_ney", "modified_kneser_ney")
INTERPOLATED = ("witten_bell", "kneser_ney", "modified_kneser_ney")
FAST_MIN_TOKENS = 2048
"""Corpora at least this long are counted by the NumPy engine (``engine="auto"``)."""
MKN_FALLBACK = (Fraction(1, 2), Fraction(1), Fraction(3, 2))
"""Modified Kneser-Ney discounts ``(D1, D2, D3+)`` used where the estimate is unusable."""


# -- the statistics one order contributes to one query -----------------------------------

@dataclass(frozen=True)
class OrderStats:
    """Integer statistics of order ``m`` for each query (lists of length ``M``), in the
    counts that order uses (raw, or continuation counts at lower Kneser-Ney orders).

    ``c_hw``: ``c(h w)``; ``c_h``: ``c(h) = Σ_w c(h w)``; ``n1``, ``n2``, ``n3p``:
    ``N1(h·)``, ``N2(h·)``, ``N3+(h·)`` (so ``N1+(h·) = n1 + n2 + n3p``);
    ``coc``: the counts-of-counts ``(n_1, n_2, n_3, n_4)`` of the whole order.
    """

    c_hw: list[int]
    c_h: list[int]
    n1: list[int]
    n2: list[int]
    n3p: list[int]
    coc: tuple[int, int, int, int]


def _plan(method: str, n: int) -> dict[int, bool]:
    """``{order m: uses continuation counts}`` for the orders ``method`` needs."""
    if method in ("mle", "add_k"):
        return {n: False}
    continuation = method in ("kneser_ney", "modified_kneser_ney")
    return {m: continuation and m < n for m in range(1, n + 1)}


# -- engine 1: plain Python, reads like the definitions ---------------------------------

def _windows(corpus: Sequence[int], m: int) -> list[tuple[int, ...]]:
    return [tuple(corpus[i:i + m]) for i in range(len(corpus) - m + 1)]


def _python_stats(corpus: np.ndarray, queries: np.ndarray, plan: dict[int, bool]):
    toks = corpus.tolist()
    qs = queries.tolist()
    n = queries.shape[1]
    out: dict[int, OrderStats] = {}
    for m, continuation in plan.items():
        if continuation:  # c(g) := N1+(·g), one per distinct (m+1)-gram ending in g
            counts = Counter(g[1:] for g in set(_windows(toks, m + 1)))
        else:
            counts = Counter(_windows(toks, m))
        by_ctx: dict[tuple[int, ...], list[int]] = {}
        for g, c in counts.items():
            by_ctx.setdefault(g[:-1], []).append(c)
        rows = []
        for q in qs:
            g = tuple(q[n - m:])
            cs = by_ctx.get(g[:-1], [])
            rows.append((counts.get(g, 0), sum(cs), cs.count(1), cs.count(2),
                         sum(c >= 3 for c in cs)))
        coc = tuple(sum(c == r for c in counts.values()) for r in (1, 2, 3, 4))
        cols = [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(5)]
        out[m] = OrderStats(*cols, coc=coc)
    return out


# -- engine 2: vectorised NumPy -----------------------------------------------------------

@dataclass
class _Level:
    """Distinct m-grams of the corpus. ``key = id(prefix (m−1)-gram)·V + last token``
    (sorted, so grams with the same prefix are contiguous); ``pos_id[i]`` = index in
    ``keys`` of the m-gram starting at corpus position ``i``; ``raw`` = its count."""

    keys: np.ndarray
    pos_id: np.ndarray
    raw: np.ndarray


def _levels(corpus: np.ndarray, n: int, vocab: int) -> list[_Level]:
    """Levels ``0 … n`` (level 0: the empty gram, one id at every position)."""
    big_n = len(corpus)
    levels = [_Level(np.zeros(1, np.int64), np.zeros(big_n + 1, np.int64),
                     np.array([big_n + 1], np.int64))]
    for m in range(1, n + 1):
        count = max(big_n - m + 1, 0)
        keys = levels[-1].pos_id[:count] * vocab + corpus[m - 1:m - 1 + count]
        uniq, inv, raw = np.unique(keys, return_inverse=True, return_counts=True)
        levels.append(_Level(uniq, inv.reshape(-1).astype(np.int64), raw.astype(np.int64)))
    return levels


def _continuation(levels: list[_Level], m: int) -> np.ndarray:
    """``N1+(·g)`` for each distinct m-gram ``g``: one per distinct (m+1)-gram, whose
    suffix is the m-gram one position further on."""
    upper = levels[m + 1]
    first = np.zeros(len(upper.keys), np.int64)
    first[upper.pos_id] = np.arange(len(upper.pos_id))
    return np.bincount(levels[m].pos_id[first + 1], minlength=len(levels[m].keys))


def _lookup(keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index of each ``wanted`` key in the sorted ``keys``, −1 where absent."""
    at = np.searchsorted(keys, wanted)
    safe = np.minimum(at, max(len(keys) - 1, 0))
    hit = (at < len(keys)) & (keys[safe] == wanted) if len(keys) else np.zeros_like(at, bool)
    return np.where(hit, at, -1)


def _gram_ids(levels: list[_Level], grams: np.ndarray, vocab: int) -> list[np.ndarray]:
    """Ids of the prefixes of length ``0 … m`` of each row of ``grams [M, m]`` (−1: unseen;
    an unseen prefix makes a negative key, which no level holds)."""
    ids = [np.zeros(len(grams), np.int64)]
    for j in range(grams.shape[1]):
        ids.append(_lookup(levels[j + 1].keys, ids[-1] * vocab + grams[:, j]))
    return ids


def _by_prefix(prefix: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Exact integer sums of ``values`` grouped by the sorted ``prefix`` ids."""
    out = np.zeros(size, np.int64)
    if len(prefix):
        starts = np.flatnonzero(np.r_[True, prefix[1:] != prefix[:-1]])
        out[prefix[starts]] = np.add.reduceat(values.astype(np.int64), starts)
    return out


def _gather(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``values[idx]``, 0 where ``idx`` is −1 (not found)."""
    if not len(values):
        return np.zeros(len(idx), np.int64)
    return np.where(idx >= 0, values[np.maximum(idx, 0)], 0)


def _numpy_stats(corpus: np.ndarray, queries: np.ndarray, vocab: int,
                 plan: dict[int, bool]):
    n = queries.shape[1]
    levels = _levels(corpus, n, vocab)
    out: dict[int, OrderStats] = {}
    for m, continuation in plan.items():
        lv = levels[m]
        c = _continuation(levels, m) if continuation else lv.raw
        prefix = lv.keys // vocab
        size = len(levels[m - 1].keys)
        per_ctx = [_by_prefix(prefix, x, size) for x in (c, c == 1, c == 2, c >= 3)]
        ids = _gram_ids(levels, queries[:, n - m:], vocab)
        ctx, gram = ids[m - 1], ids[m]
        c_hw = _gather(c, gram)
        ctx_vals = [_gather(a, ctx) for a in per_ctx]
        coc = tuple(int(np.count_nonzero(c == r)) for r in (1, 2, 3, 4))
        out[m] = OrderStats(c_hw.tolist(), *(a.tolist() for a in ctx_vals), coc=coc)
    return out


# -- exact probabilities -------------------------------------------------------------------

def mkn_discounts(coc: Sequence[int]) -> tuple[Fraction, Fraction, Fraction]:
    """Modified Kneser-Ney ``(D1, D2, D3+)`` from counts-of-counts ``(n1, n2, n3, n4)``
    (Chen & Goodman 1998, eq. 26): ``Y = n1/(n1 + 2 n2)``, ``D_r = r − (r+1)·Y·n_{r+1}/n_r``;
    ``(1/2, 1, 3/2)`` when some ``n_r`` is 0 or some ``D_r ∉ [0, r]``."""
    n1, n2, n3, n4 = (int(x) for x in coc)
    if min(n1, n2, n3, n4) == 0:
        return MKN_FALLBACK
    y = Fraction(n1, n1 + 2 * n2)
    nr = {1: n1, 2: n2, 3: n3, 4: n4}
    d = tuple(r - (r + 1) * y * Fraction(nr[r + 1], nr[r]) for r in (1, 2, 3))
    if any(not 0 <= dr <= r for r, dr in zip((1, 2, 3), d, strict=True)):
        return MKN_FALLBACK
    return d  # type: ignore[return-value]


def _interpolate(method: str, s: OrderStats, j: int, lower: Fraction, d: Fraction,
                 mkn: tuple[Fraction, Fraction, Fraction]) -> Fraction:
    """One interpolation step ``P(w|h)`` from ``P(w|h') = lower`` (``c(h) > 0``)."""
    c_hw, c_h = s.c_hw[j], s.c_h[j]
    n1, n2, n3p = s.n1[j], s.n2[j], s.n3p[j]
    if method == "witten_bell":
        lam = Fraction(c_h, c_h + n1 + n2 + n3p)
        return lam * Fraction(c_hw, c_h) + (1 - lam) * lower
    if method == "kneser_ney":
        return (max(c_hw - d, 0) + d * (n1 + n2 + n3p) * lower) / c_h
    d_of = (Fraction(0), *mkn)[min(c_hw, 3)]
    gamma = mkn[0] * n1 + mkn[1] * n2 + mkn[2] * n3p
    return (max(c_hw - d_of, 0) + gamma * lower) / c_h


def _query_prob(method: str, stats: dict[int, OrderStats], j: int, n: int, vocab: int,
                k: Fraction, d: Fraction, mkn: dict[int, tuple]) -> Fraction | None:
    if method in ("mle", "add_k"):
        s = stats[n]
        num, den = Fraction(s.c_hw[j]), Fraction(s.c_h[j])
        if method == "add_k":
            num, den = num + k, den + k * vocab
        return None if den == 0 else num / den
    p = Fraction(1, vocab)
    for m in range(1, n + 1):
        if stats[m].c_h[j] > 0:
            p = _interpolate(method, stats[m], j, p, d, mkn.get(m, MKN_FALLBACK))
    return p


def _check(corpus, queries, vocab_size, method, k, discount):
    vocab = v.integer(OP, "vocab_size", vocab_size, low=1)
    c = v.ints(OP, "corpus", corpus, ndim=1, low=0, high=vocab)
    q = v.ints(OP, "queries", queries, ndim=2, low=0, high=vocab)
    if q.shape[1] < 1:
        v.fail(OP, "queries", "shape [M, n] with n >= 1 (the model order)", f"shape {q.shape}")
    v.one_of(OP, "method", method, METHODS)
    kk = v.real(OP, "k", k, low=0.0)
    if not math.isfinite(kk):
        v.fail(OP, "k", "a finite number >= 0", repr(k))
    dd = v.real(OP, "discount", discount, low=0.0, high=1.0)
    return c, q, vocab, Fraction(kk), Fraction(dd)


def ngram_stats(corpus, queries, vocab_size: int, method: str = "add_k", *,
                engine: str = "auto") -> dict[int, OrderStats]:
    """The integer statistics each order contributes to each query (see :class:`OrderStats`);
    ``engine`` is ``"python"``, ``"numpy"`` or ``"auto"`` (NumPy for corpora of
    ``FAST_MIN_TOKENS`` or more). The NumPy keys are ``id·V + token < (N + 2)·V``; should
    that reach ``2^62`` the Python engine is used instead (same integers, slower)."""
    c, q, vocab, _, _ = _check(corpus, queries, vocab_size, method, 1.0, 0.5)
    v.one_of(OP, "engine", engine, ("auto", "python", "numpy"))
    plan = _plan(method, q.shape[1])
    if engine == "auto":
        engine = "numpy" if len(c) >= FAST_MIN_TOKENS else "python"
    if engine == "numpy" and (len(c) + 2) * vocab < 2**62:
        return _numpy_stats(c, q, vocab, plan)
    return _python_stats(c, q, plan)


def ngram_prob_exact(corpus, queries, vocab_size: int, method: str = "add_k",
                     k: float = 1.0, discount: float = 0.75, *,
                     engine: str = "auto") -> list[Fraction | None]:
    """``P(q[-1] | q[:-1])`` for each query as an exact :class:`~fractions.Fraction`
    (``None`` where it is undefined: ``mle`` with an unseen context, or ``add_k`` with
    ``k = 0`` there). Same arguments as :func:`ngram_log_prob`; formulas in the module
    docstring."""
    c, q, vocab, kk, dd = _check(corpus, queries, vocab_size, method, k, discount)
    stats = ngram_stats(c, q, vocab, method, engine=engine)
    n = q.shape[1]
    mkn = ({m: mkn_discounts(s.coc) for m, s in stats.items()}
           if method == "modified_kneser_ney" else {})
    return [_query_prob(method, stats, j, n, vocab, kk, dd, mkn) for j in range(len(q))]


_LN2 = math.log(2.0)


def ln_fraction(p: Fraction | None) -> float:
    """``ln p`` in float64 from the exact ``p``, with one rounding of ``p`` at most.

    ``p ∈ [1/2, 1]``: ``log1p(p − 1)`` (``p − 1`` is exact, so no cancellation near 1);
    a normal float: ``log(float(p))`` (``float`` of a Fraction is correctly rounded);
    below the normal range: ``ln(p·2^−e) + e·ln 2``. ``0 → −inf``; ``None → NaN``.
    """
    if p is None:
        return math.nan
    if p == 0:
        return -math.inf
    if Fraction(1, 2) <= p <= 2:
        return math.log1p(float(p - 1))
    f = float(p)
    if f >= sys.float_info.min:
        return math.log(f)
    e = p.numerator.bit_length() - p.denominator.bit_length()
    return math.log(float(p / Fraction(2) ** e)) + e * _LN2


@reference("ngram")
def ngram_log_prob(corpus, queries, vocab_size, method="add_k", k=1.0, discount=0.75,
                   dtype="float64"):
    """``ln P(q[-1] | q[:-1])`` for each row of ``queries [M, n]`` under an order-``n``
    model estimated from every window of ``corpus [N]``; returns ``[M]`` in ``dtype``.

    ``method`` ∈ ``mle, add_k, witten_bell, kneser_ney, modified_kneser_ney``; the
    formulas (context counts ``c(h) = Σ_w c(h w)``, continuation counts, the modified
    Kneser-Ney discounts and their fallback, the uniform base ``1/V``) and their sources
    are in the module docstring. The probabilities are exact Fractions
    (:func:`ngram_prob_exact`); the one rounding is the final ``ln`` in float64
    (:func:`ln_fraction`), cast to ``dtype``. ``k ≥ 0`` (only ``add_k`` reads it);
    ``discount ∈ [0, 1]`` (only ``kneser_ney`` reads it; always validated).
    """
    v.one_of(OP, "dtype", dtype, tuple(DTYPES))
    probs = ngram_prob_exact(corpus, queries, vocab_size, method, k, discount)
    return np.array([ln_fraction(p) for p in probs], dtype=np.float64).astype(DTYPES[dtype])


def pad_sentences(sentences: Sequence[Sequence[int]], n: int, bos: int, eos: int) -> np.ndarray:
    """One flat corpus from sentences: each gets ``n − 1`` ``bos`` on the left and one
    ``eos`` on the right, and they are concatenated (int64).

    The first n-gram of a sentence then predicts its first word from ``n − 1`` ``bos``;
    the last predicts ``eos`` (seed 000's ``<s>`` / ``</s>``). Windows that straddle two
    sentences (``… eos bos …``) are counted too, as in any flat corpus. Perplexity of a
    held-out sentence: score every window of its padded form (one per word plus ``eos``):

    >>> import numpy as np, lmspec
    >>> from lmspec.ngram import pad_sentences
    >>> BOS, EOS = 0, 1                      # words are ids 2 … V-1
    >>> train = pad_sentences([[2, 3, 4], [2, 4], [3, 2, 4]], n=2, bos=BOS, eos=EOS)
    >>> train.tolist()
    [0, 2, 3, 4, 1, 0, 2, 4, 1, 0, 3, 2, 4, 1]
    >>> test = pad_sentences([[2, 3, 4]], n=2, bos=BOS, eos=EOS)
    >>> windows = np.lib.stride_tricks.sliding_window_view(test, 2)   # [T + 1, n]
    >>> lp = lmspec.ngram_log_prob(train, windows, vocab_size=5, method="kneser_ney")
    >>> round(float(np.exp(-lp.mean())), 4)   # perplexity = exp(mean NLL)
    2.4545
    """
    n = v.integer("pad_sentences", "n", n, low=1)
    parts = [np.concatenate([np.full(n - 1, bos, np.int64), np.asarray(s, np.int64).reshape(-1),
                             np.array([eos], np.int64)]) for s in sentences]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
