"""Conformance inputs and properties of the core family."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from . import draw as d
from . import large_shapes as big
from .declare import Call, Close, cases, prop


@st.composite
def _reduce_call(draw, dtype: str, with_inf: bool = True) -> Call:
    """Up to three axes of 1…6; the reduced one sometimes past a tile (:func:`draw.length`).
    In about one example in four the values are normalised log-probabilities along the
    reduced axis (``x − logsumexp(x)``): then ``logsumexp(x) ≈ 0``, so an error in the
    log-sum-exp is not hidden under the output's rounding at the size of ``max x`` (a sum
    accumulated in half precision errs by a few ``u`` there)."""
    ndim = d.dim(draw, 1, 3, label="ndim")
    axis = draw(st.integers(-ndim, ndim - 1), label="axis")
    shape = [d.length(draw, 1, 6, label="reduced axis") if i == axis % ndim else
             d.dim(draw, 1, 6, label=f"dim{i}") for i in range(ndim)]
    x = d.logits(draw, dtype, shape, label="x")
    if draw(st.sampled_from([False, False, False, True]), label="normalised"):
        z = x.astype(np.float64)
        x = d.as_dtype(z - _lse(z, axis), dtype)
    if with_inf and draw(st.booleans(), label="with -inf"):
        holes = d.bools(draw, shape, label="-inf positions")
        x = np.where(holes, -np.inf, x).astype(x.dtype)
    return Call((x,), {"axis": axis})


def _lse(z: np.ndarray, axis: int) -> np.ndarray:
    """``logsumexp`` of finite float64 values along ``axis``, kept as an axis of 1."""
    if z.size == 0:
        return np.zeros_like(z)
    m = np.max(z, axis=axis, keepdims=True)
    return m + np.log(np.sum(np.exp(z - m), axis=axis, keepdims=True))


def _axis_len(call: Call) -> int:
    return call.args[0].shape[call.kwargs.get("axis", -1)]


def _mag(a: np.ndarray | None) -> float:
    """``max(1, max|a|)`` over the finite entries."""
    if a is None:
        return 1.0
    f = np.asarray(a, dtype=np.float64)
    return max(1.0, float(np.max(np.abs(f[np.isfinite(f)]), initial=0.0)))


def _logit_scale(call: Call, cot) -> float:
    """Shift-invariant ops are conditioned by the logits' magnitude: perturbing each
    ``x_i`` by a relative ``u`` moves ``x_i − max x`` by up to ``u·max|x|``, so
    probabilities move by ``p·u·max|x|`` and log-probabilities by ``u·max|x|`` (an
    implementation forming ``exp(x − logsumexp(x))`` has exactly this error)."""
    return _mag(call.args[0]) * _mag(cot)


@st.composite
def _reduce_large(draw, dtype: str) -> Call:
    """Large tier: a few rows reduced over a last axis of a width around the 64…4096-lane
    chunks of row kernels; sometimes ``-inf`` in a sparse pattern or over the tail (the
    last, partial chunk) of every row."""
    width = big.size(draw, big.WIDTHS, "width")
    rows = big.size(draw, (3, 1, 2, 5), "rows")
    regime = draw(st.sampled_from(["normal", "large"]), label="x regime")
    mag = 5.0 if regime == "normal" else min(d.FINITE_MAX[dtype] / 4, 1e4)
    x = d.floats(draw, dtype, (rows, width), -mag, mag, label="x")
    holes = draw(st.sampled_from(["none", "sparse -inf", "-inf tail"]), label="-inf")
    if holes == "sparse -inf":
        x = np.where(big.bools(draw, x.shape, 0.05, "-inf positions"), -np.inf, x)
    elif holes == "-inf tail":
        x = x.copy()
        x[:, draw(st.sampled_from([64, 128, 1, width - 1]), label="tail from"):] = -np.inf
    return Call((d.as_dtype(x, dtype),), {"axis": -1})


for _op in ("softmax", "log_softmax", "logsumexp"):
    cases(_op, k=_axis_len, scale=_logit_scale, large=_reduce_large)(_reduce_call)


@st.composite
def _cross_entropy_large(draw, dtype: str) -> Call:
    """Large tier: vocabularies of 32000, 32001 and 50257 (a partial last chunk for every
    chunk size), ``N`` of 1…129 rows, some rows ignored, targets up to the last id."""
    vocab = big.size(draw, big.VOCABS, "V")
    n = big.size(draw, big.ROWS, "N")
    regime = draw(st.sampled_from(["normal", "large"]), label="logit regime")
    mag = 5.0 if regime == "normal" else min(d.FINITE_MAX[dtype] / 4, 1e4)
    x = d.floats(draw, dtype, (n, vocab), -mag, mag, label="logits")
    t = big.ids(draw, (n,), vocab, "targets")
    if n > 1:
        t = np.where(big.bools(draw, (n,), 0.1, "ignored rows"), -100, t).astype(np.int64)
    eps = draw(st.sampled_from([0.0, 0.1]), label="label_smoothing")
    return Call((x, t), {"ignore_index": -100, "label_smoothing": eps})


CONFIDENT_GAPS = (6.0, 8.0, 10.0)
"""Margins of the true class over every other logit in the ``"true class at p ≈ 1"``
family: ``1 − p[y] ≈ (V − 1)·e^(−gap)``, which bfloat16 (and float16 from a gap of about
8 + ln(V − 1)) rounds to 0, while the gradient ``p[y] − 1`` must keep it."""


def confident(draw, dtype: str, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``x`` with each row's logit at ``t`` (a valid id) raised to the row's maximum plus a
    drawn gap (:data:`CONFIDENT_GAPS`): the true class holds nearly all the mass."""
    z = x.astype(np.float64)
    rows = np.flatnonzero((t >= 0) & (t < z.shape[1]))
    gap = draw(st.sampled_from(CONFIDENT_GAPS), label="true class gap")
    z[rows, t[rows]] = np.max(z[rows], axis=1, initial=-np.inf) + gap
    return d.as_dtype(z, dtype)


@cases("cross_entropy", scale=_logit_scale, large=_cross_entropy_large)
@st.composite
def _cross_entropy(draw, dtype: str) -> Call:
    """Rows of logits over a vocabulary of 1…8 (sometimes past a tile), some ignored, every
    smoothing; in about one example in four the true class of each row is at ``p ≈ 1``
    (:func:`confident`, ordinary or offset logits)."""
    n = d.dim(draw, 1, 6, label="N")
    vocab = d.length(draw, 1, 8, label="V")
    sure = draw(st.sampled_from([False, False, False, True]), label="true class at p ≈ 1")
    x = d.logits(draw, dtype, (n, vocab), regimes=("normal", "offset") if sure else d.REGIMES)
    ignore = draw(st.sampled_from([-100, 0, -1]), label="ignore_index")
    t = d.ints(draw, (n,), vocab, label="targets")
    drop = d.bools(draw, (n,), label="ignored rows")
    t = np.where(drop, ignore, t).astype(np.int64)
    if sure:  # mostly hard targets: smoothing's ε/V terms dwarf the gradient's 1 − p[y]
        x = confident(draw, dtype, x, t)
    eps = draw(st.sampled_from([0.0, 0.0, 0.1] if sure else [0.0, 0.1, 0.37, 1.0]),
               label="label_smoothing")
    return Call((x, t), {"ignore_index": ignore, "label_smoothing": eps})


@st.composite
def _seq_call(draw, dtype: str, regimes=("normal", "large", "ties")) -> Call:
    """Log-probabilities of ``B`` sequences of ``T`` steps (the summed axis, sometimes past
    a tile) over ``V`` words."""
    b, vocab = d.dim(draw, 1, 4, label="B"), d.dim(draw, 1, 4, label="V")
    t = d.length(draw, 1, 4, label="T")
    raw = d.logits(draw, "float64", (b, t, vocab), regimes=regimes)
    lp = d.as_dtype(np.log(np.clip(_np_softmax(raw), 1e-300, None)), dtype)
    tok = d.ints(draw, (b, t), vocab, label="tokens")
    mask = draw(st.one_of(st.none(), st.just("draw")), label="mask kind")
    m = None if mask is None else d.bools(draw, (b, t), label="mask")
    return Call((lp, tok, m))


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _seq_len(call: Call) -> int:
    return int(np.prod(call.args[1].shape))


def _seq_scale(call: Call, cot=None) -> float:
    """The terms summed are log-probabilities: M is the largest magnitude among them."""
    return _mag(call.args[0]) * _mag(cot)


cases("sequence_log_prob", k=_seq_len, scale=_seq_scale)(_seq_call)
def _ppl_scale(call: Call, cot=None) -> float:
    """PPL = exp(mean nll): an absolute error δ in the mean becomes a relative error δ
    of PPL, so M = PPL · max|log p| (· max|cotangent| for the vjp)."""
    from lmspec import perplexity

    with np.errstate(all="ignore"):
        ppl = float(perplexity(*(a if a is None or a.dtype.kind != "f" else a.astype(np.float64)
                                 for a in call.args)))
    return (ppl if np.isfinite(ppl) else 1.0) * _seq_scale(call, cot)


@cases("perplexity", k=_seq_len, scale=_ppl_scale)
def _perplexity(dtype: str) -> st.SearchStrategy[Call]:
    """Log-probabilities of ordinary logits, so that PPL stays representable in float16."""
    return _seq_call(dtype, regimes=("normal", "ties", "tiny"))


# -- properties that need no reference ------------------------------------------------

def _finite_rows(x: np.ndarray, axis: int) -> np.ndarray:
    return np.all(np.isfinite(x), axis=axis)


@prop("softmax")
def rows_sum_to_one(run, call: Call, dtype: str):
    """Each softmax slice sums to 1 (slices of finite logits)."""
    x, axis = call.args[0], call.kwargs["axis"]
    total = np.sum(run("softmax", x, axis=axis), axis=axis)
    keep = _finite_rows(x, axis)
    yield Close("Σ softmax(x) = 1", total[keep], np.ones(int(keep.sum())), k=x.shape[axis])


@st.composite
def _shifted(draw, dtype: str):
    call = draw(_reduce_call(dtype, with_inf=False))
    c = draw(st.sampled_from([-7.0, 0.5, 3.0, 64.0]), label="shift c")
    return call, c


@prop("softmax", strategy=_shifted)
def shift_invariance(run, drawn, dtype: str):
    """softmax(x + c) = softmax(x); the rounding of x + c is charged to the tolerance."""
    call, c = drawn
    x, axis = call.args[0], call.kwargs["axis"]
    xs = d.as_dtype(x.astype(np.float64) + c, dtype)
    scale = max(1.0, float(np.max(np.abs(xs.astype(np.float64)))))
    yield Close("softmax(x + c) = softmax(x)", run("softmax", xs, axis=axis),
                run("softmax", x, axis=axis), k=x.shape[axis], scale=scale)


@prop("log_softmax")
def exp_is_softmax(run, call: Call, dtype: str):
    """exp(log_softmax(x)) = softmax(x) (both of the implementation under test)."""
    x, axis = call.args[0], call.kwargs["axis"]
    yield Close("exp(log_softmax(x)) = softmax(x)", np.exp(run("log_softmax", x, axis=axis)),
                run("softmax", x, axis=axis), k=x.shape[axis])


@prop("logsumexp")
def log_softmax_identity(run, call: Call, dtype: str):
    """log_softmax(x) = x − logsumexp(x), on slices of finite logits."""
    x, axis = call.args[0], call.kwargs["axis"]
    lse = np.expand_dims(run("logsumexp", x, axis=axis), axis)
    keep = np.broadcast_to(np.expand_dims(_finite_rows(x, axis), axis), x.shape)
    scale = max(1.0, float(np.max(np.abs(x[keep]), initial=0.0)))
    yield Close("x − logsumexp(x) = log_softmax(x)", (x - lse)[keep],
                run("log_softmax", x, axis=axis)[keep], k=x.shape[axis], scale=scale)


@prop("cross_entropy")
def mean_of_picked_log_softmax(run, call: Call, dtype: str):
    """With ε = 0, CE = mean over kept rows of −log_softmax(logits)[y]."""
    x, t = call.args
    ignore = call.kwargs["ignore_index"]
    keep = t != ignore
    if not keep.any():
        return
    lp = run("log_softmax", x, axis=-1)
    expected = -np.mean(lp[np.nonzero(keep)[0], t[keep]])
    scale = max(1.0, float(np.max(np.abs(x.astype(np.float64)))))
    yield Close("CE = mean −log p[y]", run("cross_entropy", x, t, ignore_index=ignore),
                expected, k=x.shape[1], scale=scale)


@st.composite
def _two_sequences(draw, dtype: str):
    a = draw(_seq_call(dtype))
    t2 = d.dim(draw, 1, 3, label="T2")
    vocab = a.args[0].shape[2]
    b = a.args[0].shape[0]
    lp2 = d.as_dtype(np.log(_np_softmax(d.logits(draw, "float64", (b, t2, vocab)))), dtype)
    return a, Call((lp2, d.ints(draw, (b, t2), vocab, label="tokens2"), None))


@prop("sequence_log_prob", strategy=_two_sequences)
def chain_rule_additivity(run, drawn, dtype: str):
    """ln P(a ⧺ b) = ln P(a) + ln P(b): the chain rule over a concatenation."""
    a, b = drawn
    (lpa, ta, ma), (lpb, tb, _) = a.args, b.args
    mab = None if ma is None else np.concatenate([ma, np.ones(tb.shape, dtype=bool)], axis=1)
    whole = run("sequence_log_prob", np.concatenate([lpa, lpb], axis=1),
                np.concatenate([ta, tb], axis=1), mab)
    parts = run("sequence_log_prob", lpa, ta, ma) + run("sequence_log_prob", lpb, tb, None)
    yield Close("slp(a ⧺ b) = slp(a) + slp(b)", whole, parts,
                k=ta.shape[1] + tb.shape[1], scale=max(_seq_scale(a), _seq_scale(b)))


@st.composite
def _uniform(draw, dtype: str):
    b, t, vocab = (d.dim(draw, 1, 5, label=n) for n in ("B", "T", "V"))
    lp = d.as_dtype(np.full((b, t, vocab), -np.log(vocab)), dtype)
    return lp, d.ints(draw, (b, t), vocab, label="tokens")


@prop("perplexity", strategy=_uniform)
def uniform_model_is_vocab_size(run, drawn, dtype: str):
    """A uniform model over V words has perplexity V (up to rounding of −ln V)."""
    lp, tok = drawn
    vocab = lp.shape[2]
    yield Close("PPL(uniform) = V", run("perplexity", lp, tok), float(vocab),
                k=tok.size, scale=vocab * max(1.0, np.log(vocab)))
