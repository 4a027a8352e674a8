"""The core reference against independent oracles: SciPy, mpmath, finite differences."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.special as sp

import lmspec

RNG = np.random.default_rng(20261121)


def _x(*shape, scale=3.0):
    return RNG.normal(scale=scale, size=shape)


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_softmax_family_matches_scipy(axis, scale):
    x = _x(3, 5, 4, scale=scale)
    np.testing.assert_allclose(lmspec.softmax(x, axis), sp.softmax(x, axis=axis), rtol=1e-13,
                               atol=1e-300)
    np.testing.assert_allclose(lmspec.log_softmax(x, axis), sp.log_softmax(x, axis=axis),
                               rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(lmspec.logsumexp(x, axis), sp.logsumexp(x, axis=axis), rtol=1e-14)


def test_infinities():
    x = np.array([[-np.inf, -np.inf], [0.0, -np.inf], [np.inf, 1.0]])
    np.testing.assert_array_equal(lmspec.logsumexp(x), [-np.inf, 0.0, np.inf])
    p = lmspec.softmax(x)
    assert np.isnan(p[0]).all() and (p[1] == [1.0, 0.0]).all()
    assert lmspec.log_softmax(x)[1, 1] == -np.inf



@pytest.mark.parametrize("value", [-np.inf, np.inf, -1e308, 0.0, 2.5])
@pytest.mark.parametrize("axis", [0, 1])
def test_one_element_axis_is_exact_whatever_the_value(value, axis):
    """CONTRACT §6: over a one-element axis softmax is 1, log_softmax 0, logsumexp the
    value itself with gradient 1 (the cotangent), −inf included."""
    x = np.array([[value, 1.0]]) if axis == 0 else np.array([[value], [1.0]])
    ones = np.ones_like(x)
    np.testing.assert_array_equal(lmspec.softmax(x, axis), ones)
    np.testing.assert_array_equal(lmspec.log_softmax(x, axis), 0 * ones)
    np.testing.assert_array_equal(lmspec.logsumexp(x, axis), np.squeeze(x, axis))
    cot = np.array([3.0, -2.0])
    (g,) = lmspec.vjp("logsumexp", (x,), {"axis": axis}, cot)
    np.testing.assert_array_equal(g, np.expand_dims(cot, axis) * ones)
    for op in ("softmax", "log_softmax"):
        (g,) = lmspec.vjp(op, (x,), {"axis": axis}, 2 * ones)
        assert np.all(np.isfinite(g)), (op, g)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_one_element_minus_inf_softmax_passes_the_gate(dtype):
    """A kernel answering the contract's exact 1 (0 for log_softmax) is not a failure."""
    x = np.array([[-np.inf], [2.0]])
    lmspec.assert_close("softmax", (x,), {"axis": -1}, np.ones((2, 1)), dtype)
    lmspec.assert_close("log_softmax", (x,), {"axis": -1}, np.zeros((2, 1)), dtype)
    lmspec.assert_close("logsumexp", (x,), {"axis": -1}, np.array([-np.inf, 2.0]), dtype)


def test_two_or_more_minus_inf_stay_nan_and_minus_inf():
    """Only a one-element axis is exact: an all −inf slice of ≥ 2 elements is 0/0."""
    x = np.full((2, 3), -np.inf)
    assert np.isnan(lmspec.softmax(x)).all() and np.isnan(lmspec.log_softmax(x)).all()
    np.testing.assert_array_equal(lmspec.logsumexp(x), [-np.inf, -np.inf])
    np.testing.assert_array_equal(lmspec.logsumexp(x, 0), [-np.inf] * 3)


def test_cross_entropy_with_one_class_is_zero():
    """V = 1: every row's only class has probability 1, whatever its logit."""
    logits = np.array([[-np.inf], [7.0], [np.inf]])
    assert lmspec.cross_entropy(logits, np.array([0, 0, 0])) == 0.0


def _mp_cross_entropy(logits, targets, ignore, eps):
    mpmath.mp.dps = 50
    rows = []
    for row, t in zip(logits.tolist(), targets.tolist()):
        if t == ignore:
            continue
        lse = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in row))
        nll = lse - row[t]
        smooth = mpmath.fsum(lse - v for v in row) / len(row)
        rows.append((1 - mpmath.mpf(eps)) * nll + mpmath.mpf(eps) * smooth)
    return float(mpmath.fsum(rows) / len(rows)) if rows else math.nan


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignore", [-100, 2])
def test_cross_entropy_matches_mpmath(eps, ignore):
    logits = _x(6, 5, scale=4.0)
    targets = RNG.integers(0, 5, size=6)
    targets[1] = ignore
    got = lmspec.cross_entropy(logits, targets, ignore_index=ignore, label_smoothing=eps)
    assert got == pytest.approx(_mp_cross_entropy(logits, targets, ignore, eps), rel=1e-14)


def test_cross_entropy_all_ignored_is_nan_with_zero_gradient():
    logits, targets = _x(3, 4), np.full(3, -100)
    assert math.isnan(lmspec.cross_entropy(logits, targets))
    (g, t) = lmspec.vjp("cross_entropy", (logits, targets), {}, 1.0)
    assert t is None and (g == 0).all()


def _log_probs(b, t, v):
    return sp.log_softmax(_x(b, t, v), axis=-1)


def test_sequence_log_prob_is_the_chain_rule():
    lp = _log_probs(2, 4, 6)
    tok = RNG.integers(0, 6, size=(2, 4))
    mask = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=bool)
    want = [sum(lp[b, t, tok[b, t]] for t in range(4) if mask[b, t]) for b in range(2)]
    np.testing.assert_allclose(lmspec.sequence_log_prob(lp, tok, mask), want, rtol=1e-15)
    lp[0, 3, tok[0, 3]] = -np.inf  # a masked -inf contributes exactly 0
    assert np.isfinite(lmspec.sequence_log_prob(lp, tok, mask)).all()


def test_perplexity_of_uniform_model_is_vocab_size():
    v = 7
    lp = np.full((2, 3, v), -math.log(v))
    assert lmspec.perplexity(lp, RNG.integers(0, v, size=(2, 3))) == pytest.approx(v, rel=1e-14)
    assert math.isnan(lmspec.perplexity(lp, np.zeros((2, 3), int), np.zeros((2, 3), bool)))


CALLS = {
    "softmax": ((_x(3, 4),), {"axis": 0}),
    "log_softmax": ((_x(2, 5),), {}),
    "logsumexp": ((_x(2, 3, 4),), {"axis": 1}),
    "cross_entropy": ((_x(5, 4), np.array([0, 3, -100, 1, 2])), {"label_smoothing": 0.2}),
    "sequence_log_prob": ((_log_probs(2, 3, 4), RNG.integers(0, 4, (2, 3)),
                           RNG.random((2, 3)) < 0.7), {}),
    "perplexity": ((_log_probs(2, 3, 4), RNG.integers(0, 4, (2, 3)), None), {}),
}


@pytest.mark.parametrize("op", list(CALLS))
def test_vjp_matches_finite_differences(op, fd_vjp):
    args, kw = CALLS[op]
    f = lmspec.OPS[op].reference
    out = f(*args, **kw)
    cot = RNG.normal(size=np.shape(out))
    got = lmspec.vjp(op, args, kw, cot)
    want = fd_vjp(op, args, kw, cot)
    for i, name in enumerate(lmspec.OPS[op].params[: len(args)]):
        if name in lmspec.OPS[op].diff:
            np.testing.assert_allclose(got[i], want[i], rtol=1e-6, atol=1e-8, err_msg=name)
        else:
            assert got[i] is None and want[i] is None


def test_baseline_precision_follows_computing_in():
    x = _x(3, 4).astype(np.float32)
    assert lmspec.softmax(x).dtype == np.float64
    with lmspec.computing_in("float32"):
        assert lmspec.softmax(x).dtype == np.float32
        assert lmspec.vjp("softmax", (x,), {}, np.ones((3, 4), np.float32))[0].dtype == np.float32


BAD = [
    ("softmax", (np.array([True, False]),), {}, "argument 'x' must be a float array"),
    ("softmax", (np.float64(1.0),), {}, "at least 1 dimension"),
    ("softmax", (_x(2, 3),), {"axis": 2}, "argument 'axis' must be an axis in [-2, 2)"),
    ("cross_entropy", (_x(2, 3), np.array([0, 3])), {}, "argument 'targets' must be values in"),
    ("cross_entropy", (_x(2, 3), np.array([0.0, 1.0])), {}, "must be an integer array"),
    ("cross_entropy", (_x(2, 3), np.array([0, 1, 2])), {}, "argument 'targets' must be shape [2]"),
    ("cross_entropy", (_x(2, 3), np.array([0, 1])), {"label_smoothing": 1.5},
     "argument 'label_smoothing' must be a number in [0.0, 1.0]"),
    ("cross_entropy", (_x(3), np.array([0])), {}, "argument 'logits' must be a 2-d array"),
    ("perplexity", (_x(1, 2, 3), np.zeros((1, 2), int), np.ones((1, 2), int)), {},
     "argument 'mask' must be a bool mask"),
    ("sequence_log_prob", (_x(1, 2, 3), np.zeros((2, 1), int)), {},
     "argument 'tokens' must be shape [1, 2]"),
]


@pytest.mark.parametrize("op, args, kw, msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_op_and_argument(op, args, kw, msg):
    with pytest.raises(ValueError) as info:
        lmspec.OPS[op].reference(*args, **kw)
    assert str(info.value).startswith(f"{op}: ") and msg in str(info.value)


def test_unknown_op_and_non_differentiable():
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        lmspec.vjp("nope", (), {}, None)
