"""The training family's reference against independent oracles (scipy, torch, plain
Python), its vjps against central differences, its input validation, the torch backend,
and the integer comparisons of the conformance module."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special

pytest.importorskip("torch")

import torch
import torch.nn.functional as F

import lmspec
from lmspec import training as tr
from lmspec.backends import torch_training as tt
from lmspec.backends.torch_backend import TorchBackend
from lmspec.conformance import cases_training as ct
from lmspec.conformance.declare import Call
from lmspec.conformance.tolerance import floor

RNG = np.random.default_rng(1234)
BACKEND = TorchBackend("torch-cpu", "cpu", ("float32", "float64"))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    return scipy.special.log_softmax(x, axis=-1)


# -- kl_divergence ---------------------------------------------------------------------

def test_kl_matches_scipy_rel_entr():
    lp, lq = _log_softmax(RNG.normal(size=(4, 6))), _log_softmax(RNG.normal(size=(4, 6)))
    want = scipy.special.rel_entr(np.exp(lp), np.exp(lq)).sum() / 4
    assert lmspec.kl_divergence(lp, lq) == pytest.approx(want, rel=1e-13)


def test_kl_zero_p_terms_count_zero():
    lp = np.array([[0.0, -np.inf], [math.log(0.5), math.log(0.5)]])
    lq = np.array([[-0.1, -np.inf], [math.log(0.25), math.log(0.75)]])
    want = (0.0 - (-0.1) + 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)) / 2
    assert lmspec.kl_divergence(lp, lq) == pytest.approx(want, rel=1e-14)
    g_p, g_q = lmspec.vjp("kl_divergence", (lp, lq), {}, 1.0)
    assert g_p[0, 1] == 0 and g_q[0, 1] == 0


def test_kl_infinite_when_q_misses_mass():
    lp = np.log(np.array([[0.5, 0.5]]))
    assert lmspec.kl_divergence(lp, np.array([[0.0, -np.inf]])) == np.inf


@pytest.mark.parametrize("seed", range(3))
def test_kl_vjp_matches_central_differences(fd_vjp, seed):
    rng = np.random.default_rng(seed)
    lp, lq = rng.normal(size=(3, 5)) - 2, rng.normal(size=(3, 5)) - 2
    cot = 1.7
    got = lmspec.vjp("kl_divergence", (lp, lq), {}, cot)
    want = fd_vjp("kl_divergence", (lp, lq), {}, cot)
    for i in range(2):
        np.testing.assert_allclose(got[i], want[i], rtol=1e-6, atol=1e-8)


# -- distillation_loss -------------------------------------------------------------------

def _torch_distillation(s, t, y, temperature, alpha):
    """Hinton et al.'s loss written directly with torch (the oracle)."""
    s, t, y = torch.tensor(s), torch.tensor(t), torch.tensor(y)
    soft = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1),
                    reduction="batchmean")
    return float(alpha * F.cross_entropy(s, y) + (1 - alpha) * temperature**2 * soft)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.3), (0.25, 0.9),
                                               (7.5, 0.0), (3.0, 1.0)])
def test_distillation_matches_torch(temperature, alpha):
    s, t = RNG.normal(size=(4, 5)) * 2, RNG.normal(size=(4, 5)) * 2
    y = RNG.integers(0, 5, size=4)
    got = lmspec.distillation_loss(s, t, y, temperature, alpha)
    assert got == pytest.approx(_torch_distillation(s, t, y, temperature, alpha), rel=1e-12)


def test_distillation_alpha_one_is_cross_entropy_and_same_teacher_is_alpha_ce():
    s, t = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
    y = np.array([0, 3, 2])
    ce = lmspec.cross_entropy(s, y)
    assert lmspec.distillation_loss(s, t, y, 2.0, 1.0) == pytest.approx(ce, rel=1e-14)
    assert lmspec.distillation_loss(s, s, y, 2.0, 0.3) == pytest.approx(0.3 * ce, rel=1e-14)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.5, 0.2), (0.5, 0.0),
                                               (4.0, 1.0)])
def test_distillation_vjp_matches_central_differences(fd_vjp, temperature, alpha):
    s, t = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
    y = RNG.integers(0, 4, size=3)
    kw = {"temperature": temperature, "alpha": alpha}
    cot = -0.8
    got = lmspec.vjp("distillation_loss", (s, t, y), kw, cot)
    want = fd_vjp("distillation_loss", (s, t, y), kw, cot)
    for i in range(2):
        np.testing.assert_allclose(got[i], want[i], rtol=1e-6, atol=1e-8)
    assert got[2] is None and want[2] is None


# -- clip_grad_norm ----------------------------------------------------------------------

def _clip_oracle(grads, max_norm, p):
    flat = np.concatenate([g.ravel() for g in grads])
    total = np.linalg.norm(flat, ord=p)
    coef = 1.0 if total == 0 else min(1.0, max_norm / total)
    return [g * coef for g in grads], total


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("max_norm", [0.1, 1.0, 100.0])
def test_clip_matches_numpy_norm(p, max_norm):
    grads = (RNG.normal(size=(2, 3)), RNG.normal(size=4), np.array(0.7))
    (clipped, total) = lmspec.clip_grad_norm(grads, max_norm, p)
    want, want_total = _clip_oracle(grads, max_norm, p)
    assert total == pytest.approx(want_total, rel=1e-14)
    for c, w in zip(clipped, want, strict=True):
        np.testing.assert_allclose(c, w, rtol=1e-14)


def test_clip_matches_torch_up_to_its_epsilon():
    grads = (RNG.normal(size=(3, 3)) * 5, RNG.normal(size=2))
    params = [torch.zeros(g.shape, dtype=torch.float64) for g in grads]
    for prm, g in zip(params, grads, strict=True):
        prm.grad = torch.tensor(g)
    total_t = torch.nn.utils.clip_grad_norm_(params, 1.0)
    clipped, total = lmspec.clip_grad_norm(grads, 1.0)
    assert total == pytest.approx(float(total_t), rel=1e-14)
    for c, prm in zip(clipped, params, strict=True):  # torch divides by total + 1e-6
        np.testing.assert_allclose(c, prm.grad.numpy() * (float(total) + 1e-6) / float(total),
                                   rtol=1e-13)


def test_clip_edge_cases():
    zeros = (np.zeros(3), np.zeros((2, 2)))
    out, total = lmspec.clip_grad_norm(zeros, 0.0)
    assert total == 0 and all(np.array_equal(a, b) for a, b in zip(out, zeros, strict=True))
    (huge, small), total = lmspec.clip_grad_norm((np.array([1e200]), np.array([1.0, -1.0])),
                                                 1.0, 3.0)
    assert total == 1e200 and huge[0] == pytest.approx(1.0) and small[0] == pytest.approx(1e-200)
    (g,), total = lmspec.clip_grad_norm((np.array([3.0, -4.0]),), 2.0, math.inf)
    assert total == 4.0 and np.array_equal(g, [1.5, -2.0])
    (g,), total = lmspec.clip_grad_norm((np.array([1e-200, 1e-200]),), 1.0, 3.0)
    assert total == pytest.approx(2 ** (1 / 3) * 1e-200, rel=1e-14)
    assert lmspec.clip_grad_norm((), 1.0)[1] == 0


def _clip_rescaled(grads, max_norm, norm_type=2.0):
    """A correct clipping kernel: the p-norm as ``m·‖g/m‖_p``, ``m = max|g|`` (as the
    reference), so that ``Σ|g|^p`` cannot overflow."""
    flat = torch.cat([g.abs().reshape(-1) for g in grads])
    m = flat.max() if flat.numel() else flat.new_zeros(())
    total = m if norm_type == math.inf or m == 0 else m * ((flat / m) ** norm_type).sum() ** (
        1 / norm_type)
    coef = torch.where(total == 0, torch.ones_like(total), torch.clamp(max_norm / total, max=1))
    return tuple(g * coef for g in grads), total


@pytest.mark.parametrize("p", [3.0, 2.0])
@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_clipped_norm_property_does_not_overflow_at_1e152(monkeypatch, p, factor):
    """The judge measures the clipped gradients with the spec's scaled norm: a rescaling
    kernel passes at |g| ≈ 1e152 in float64 with ``max_norm`` at (or above) the total,
    so that the clipped gradients stay that large, where the literal Σ|g|³ of
    ``np.linalg.norm`` overflows (and made the property fail it)."""
    from hypothesis import strategies as st

    from lmspec.conformance.declare import CASES
    from tests.conftest import MutantBackend, run_checks

    grads = (np.array([1.0e152, -3.0e151]), np.array([[7.0e151, 2.0e152]]))
    limit = factor * float(tr.global_norm(grads, p))
    call = Call((grads,), {"max_norm": limit, "norm_type": p})
    clipped, _ = _clip_rescaled(tuple(map(torch.tensor, grads)), limit, p)
    judged = np.concatenate([c.numpy().ravel() for c in clipped])
    assert np.isinf(np.linalg.norm(judged, ord=3.0))  # the former judge's arithmetic
    assert float(tr.global_norm((judged,), p)) == pytest.approx(limit / factor, rel=1e-14)
    monkeypatch.setattr(CASES["clip_grad_norm"], "strategy", lambda dtype: st.just(call))
    backend = MutantBackend({"clip_grad_norm": _clip_rescaled})
    results = run_checks(backend, "clip_grad_norm", ("float64",),
                         ("forward", "clipped_norm_at_most_max_norm", "one_common_factor"),
                         max_examples=3)
    assert [r["status"] for r in results] == ["pass"] * 3, [r["message"] for r in results]

def test_clip_is_not_differentiable():
    with pytest.raises(ValueError, match="not differentiable"):
        lmspec.vjp("clip_grad_norm", ((np.ones(2),),), {"max_norm": 1.0}, None)


# -- mlm_mask ----------------------------------------------------------------------------

def _mlm_loop(tokens, su, au, rnd, mid, prob, able):
    """The rule position by position, in plain Python."""
    inputs, labels = tokens.copy(), np.full_like(tokens, -100)
    for i in np.ndindex(tokens.shape):
        if able[i] and su[i] < prob:
            labels[i] = tokens[i]
            if au[i] < 0.8:
                inputs[i] = mid
            elif au[i] < 0.9:
                inputs[i] = rnd[i]
    return inputs, labels


@pytest.mark.parametrize("prob", [0.0, 0.15, 0.5, 1.0])
def test_mlm_matches_loop(prob):
    tokens = RNG.integers(0, 9, size=(3, 7))
    su, au = RNG.random((3, 7)), RNG.random((3, 7))
    au[0, :3] = [0.8, 0.9, np.nextafter(0.8, 0)]
    rnd = RNG.integers(0, 9, size=(3, 7))
    able = RNG.random((3, 7)) < 0.7
    got = lmspec.mlm_mask(tokens, su, au, rnd, 9, prob, able)
    for g, w in zip(got, _mlm_loop(tokens, su, au, rnd, 9, prob, able), strict=True):
        assert g.dtype == np.int64 and np.array_equal(g, w)


def test_mlm_hand_example():
    inputs, labels = lmspec.mlm_mask(np.array([[5, 6, 7, 8]]), np.array([[0.1, 0.1, 0.1, 0.5]]),
                                     np.array([[0.5, 0.85, 0.95, 0.1]]),
                                     np.array([[1, 2, 3, 4]]), 99)
    assert inputs.tolist() == [[99, 2, 7, 8]] and labels.tolist() == [[5, 6, 7, -100]]
    inputs, labels = lmspec.mlm_mask(np.array([[5, 6]]), np.zeros((1, 2)), np.zeros((1, 2)),
                                     np.array([[1, 2]]), 99, 0.15, np.zeros((1, 2), bool))
    assert inputs.tolist() == [[5, 6]] and labels.tolist() == [[-100, -100]]


def test_mlm_compares_the_given_float32_draws_exactly():
    """float32 0.9 is 0.89999998 < 0.9: the spec sends it to the random-token bin."""
    au = np.array([[np.float32(0.9), np.float32(0.8)]])
    inputs, _ = lmspec.mlm_mask(np.array([[5, 6]]), np.zeros((1, 2), np.float32), au,
                                np.array([[1, 2]]), 99)
    assert inputs.tolist() == [[1, 2]]


# -- sample_token ------------------------------------------------------------------------

def _sample_python(row, u, temperature, top_k, top_p):
    """The catalogue's wording, one row, in plain Python floats."""
    if temperature == 0:
        return max(range(len(row)), key=lambda i: (row[i], -i))
    z = [x / temperature for x in row]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    p = [x / math.fsum(e) for x in e]
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    if top_k:
        order = order[:top_k]
    mass = math.fsum(p[i] for i in order)
    q = {i: p[i] / mass for i in order}
    if top_p < 1:
        kept, acc = [], 0.0
        for i in order:
            if kept and acc >= top_p:
                break
            kept.append(i)
            acc += q[i]
        order = kept
        mass = math.fsum(q[i] for i in order)
        q = {i: q[i] / mass for i in order}
    acc = 0.0
    for i in order:
        acc += q[i]
        if acc > u:
            return i
    return order[-1]


@pytest.mark.parametrize("seed", range(40))
def test_sample_matches_plain_python(seed):
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(1, 8))
    x = np.round(rng.normal(size=(5, vocab)) * 2, 1)  # rounding makes ties
    u = rng.random(5)
    temperature = float(rng.choice([0.0, 0.3, 1.0, 4.0]))
    top_k, top_p = int(rng.integers(0, vocab + 2)), float(rng.choice([1.0, 0.0, 0.5, 0.9]))
    got = lmspec.sample_token(x, u, temperature, top_k, top_p)
    want = [_sample_python(list(r), ui, temperature, top_k, top_p) for r, ui in zip(x, u)]
    assert got.dtype == np.int64 and got.tolist() == want


def test_sample_greedy_and_top_k_one():
    x = np.array([[1.0, 3.0, 3.0, 0.0]])
    assert lmspec.sample_token(x, np.array([0.99]), 0.0).tolist() == [1]
    assert lmspec.sample_token(x, np.array([0.99]), 1.0, top_k=1).tolist() == [1]
    assert lmspec.sample_token(x, np.array([0.99]), 1.0, top_p=0.0).tolist() == [1]


def test_sample_top_p_keeps_the_crossing_token():
    x = np.log(np.array([[0.5, 0.3, 0.2]]))
    # mass 0.5 < 0.6 after the first token, so the second (which crosses 0.6) stays:
    # kept {0.5, 0.3}, renormalised 0.625 / 0.375; u = 0.7 falls in the second bin
    assert lmspec.sample_token(x, np.array([0.7]), 1.0, top_p=0.6).tolist() == [1]
    assert lmspec.sample_token(x, np.array([0.99]), 1.0, top_p=0.6).tolist() == [1]


def test_sample_grid_frequencies_are_the_filtered_distribution():
    x = np.log(np.array([[0.1, 0.4, 0.2, 0.3]]))
    grid = (np.arange(1000) + 0.5) / 1000
    ids = lmspec.sample_token(np.repeat(x, 1000, axis=0), grid, 1.0, top_k=3)
    np.testing.assert_allclose(np.bincount(ids, minlength=4) / 1000,
                               [0, 4 / 9, 2 / 9, 3 / 9], atol=1.001e-3)


# -- validation ---------------------------------------------------------------------------

BAD = [
    ("kl_divergence", (np.zeros((2, 3)), np.zeros((2, 4))), {}, "log_q"),
    ("kl_divergence", (np.zeros(3), np.zeros(3)), {}, "log_p"),
    ("distillation_loss", (np.zeros((2, 3)), np.zeros((2, 3)), np.array([0, 3])), {},
     "targets"),
    ("distillation_loss", (np.zeros((2, 3)), np.zeros((2, 3)), np.array([0, -100])), {},
     "targets"),
    ("distillation_loss", (np.zeros((2, 3)), np.zeros((2, 3)), np.array([0, 1])),
     {"temperature": 0.0}, "temperature"),
    ("distillation_loss", (np.zeros((2, 3)), np.zeros((2, 3)), np.array([0, 1])),
     {"alpha": 1.5}, "alpha"),
    ("clip_grad_norm", (np.ones(3), 1.0), {}, "grads"),
    ("clip_grad_norm", ((np.ones(3), np.array([True])), 1.0), {}, r"grads\[1\]"),
    ("clip_grad_norm", ((np.ones(3),), -1.0), {}, "max_norm"),
    ("clip_grad_norm", ((np.ones(3),), 1.0), {"norm_type": 0.0}, "norm_type"),
    ("mlm_mask", (np.zeros((1, 2), int), np.zeros((1, 2)), np.ones((1, 2)),
                  np.zeros((1, 2), int), 9), {}, "action_u"),
    ("mlm_mask", (np.zeros((1, 2), int), np.zeros((1, 3)), np.zeros((1, 2)),
                  np.zeros((1, 2), int), 9), {}, "select_u"),
    ("mlm_mask", (np.zeros((1, 2), int), np.zeros((1, 2)), np.zeros((1, 2)),
                  np.zeros((1, 2), int), 9), {"maskable": np.ones((1, 2), int)}, "maskable"),
    ("mlm_mask", (np.zeros((1, 2), int), np.zeros((1, 2)), np.zeros((1, 2)),
                  np.zeros((1, 2), int), -1), {}, "mask_token_id"),
    ("mlm_mask", (np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)),
                  np.zeros((1, 2), int), 1), {}, "tokens"),
    ("sample_token", (np.zeros((2, 3)), np.array([0.5, 1.0])), {}, "'u'"),
    ("sample_token", (np.zeros((2, 3)), np.array([0.5, 0.5])), {"temperature": -1.0},
     "temperature"),
    ("sample_token", (np.zeros((2, 3)), np.array([0.5, 0.5])), {"top_k": -1}, "top_k"),
    ("sample_token", (np.zeros((2, 3)), np.array([0.5, 0.5])), {"top_p": 1.5}, "top_p"),
    ("sample_token", (np.zeros((2, 0)), np.array([0.5, 0.5])), {}, "logits"),
]


@pytest.mark.parametrize("op,args,kwargs,arg", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_bad_input_raises_value_error_naming_op_and_argument(op, args, kwargs, arg):
    with pytest.raises(ValueError, match=f"{op}: argument {arg}" if arg.startswith("'")
                       else f"{op}: argument '{arg}"):
        getattr(lmspec, op)(*args, **kwargs)


# -- the torch backend against the reference ------------------------------------------------

def test_backend_kl_and_distillation_match_reference():
    lp = _log_softmax(RNG.normal(size=(3, 4)))
    lq = _log_softmax(RNG.normal(size=(3, 4)))
    absent = lp.copy()
    absent[1, 2] = -np.inf  # p = 0: F.kl_div's 0·∞ term is NaN, the declared deviation
    assert tt.kl_nan_terms((absent, lq), {}) and not tt.kl_nan_terms((lp, lq), {})
    assert np.isnan(BACKEND.kl_divergence(absent, lq))
    assert np.isfinite(lmspec.kl_divergence(absent, lq))
    assert BACKEND.kl_divergence(lp, lq) == pytest.approx(lmspec.kl_divergence(lp, lq),
                                                           rel=1e-13)
    for got, want in zip(BACKEND.vjp("kl_divergence", (lp, lq), {}, np.array(0.5)),
                         lmspec.vjp("kl_divergence", (lp, lq), {}, 0.5), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    s, t, y = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4)), np.array([1, 0, 3])
    kw = {"temperature": 3.0, "alpha": 0.4}
    assert BACKEND.distillation_loss(s, t, y, **kw) == pytest.approx(
        lmspec.distillation_loss(s, t, y, **kw), rel=1e-13)
    for got, want in zip(BACKEND.vjp("distillation_loss", (s, t, y), kw, np.array(1.3))[:2],
                         lmspec.vjp("distillation_loss", (s, t, y), kw, 1.3)[:2], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_backend_clip_mlm_and_sampling_match_reference():
    grads = (RNG.normal(size=(2, 2)), np.array(2.0))
    (got, total) = BACKEND.clip_grad_norm(grads, 0.5)
    (want, want_total) = lmspec.clip_grad_norm(grads, 0.5)
    assert got[1].shape == () and float(total) == pytest.approx(float(want_total), rel=1e-14)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5)  # the documented 1e-6 deviation
    args = (RNG.integers(0, 9, (3, 6)), RNG.random((3, 6)), RNG.random((3, 6)),
            RNG.integers(0, 9, (3, 6)), 9, 0.5, RNG.random((3, 6)) < 0.5)
    for g, w in zip(BACKEND.mlm_mask(*args), lmspec.mlm_mask(*args), strict=True):
        assert np.array_equal(g, w)
    x, u = RNG.normal(size=(6, 5)), RNG.random(6)
    for kw in ({}, {"temperature": 0.0}, {"top_k": 2}, {"top_p": 0.7, "temperature": 2.0}):
        assert np.array_equal(BACKEND.sample_token(x, u, **kw), lmspec.sample_token(x, u, **kw))


def test_backend_documents_the_clipping_deviation():
    clip = BACKEND.deviations["clip_grad_norm"]
    assert "1e-6" in clip.reason and clip.applies is tt.clip_differs
    # in the half dtypes the predicate stands beside the coefficient's rounding bound
    half = LOWP.deviations["clip_grad_norm/forward/float16"]
    assert [d.bound for d in half] == ["float16", None] and half[1] is clip
    assert "kl_divergence" in BACKEND.info()["notes"]


# -- the integer comparisons -----------------------------------------------------------------

def _tol(dtype):
    return lambda k, m: floor(dtype, k, m)


def test_mlm_compare_accepts_only_the_rounded_threshold():
    f32 = np.float32
    call = Call((np.array([[5, 6, 7]]), np.zeros((1, 3), f32),
                 np.array([[f32(0.9), f32(0.5), f32(0.95)]]), np.array([[1, 2, 3]]), 99, 0.15,
                 None))
    inputs, labels = lmspec.mlm_mask(*call.args)
    assert inputs.tolist() == [[1, 99, 7]]
    # torch compares with float32(0.9) = 0.89999998 and keeps the token: ambiguous, accepted
    ok, amb, _ = ct.compare_mlm_mask(call, inputs, np.array([[5, 99, 7]]), "float32",
                                     _tol("float32"))
    assert ok and amb == 1
    ok, amb, msg = ct.compare_mlm_mask(call, inputs, np.array([[1, 99, 3]]), "float32",
                                       _tol("float32"))
    assert not ok and msg == "inputs[0,2]=3, but should be 7"
    assert ct.compare_mlm_mask(call, labels, labels, "float32", _tol("float32")) == (True, 0, "")
    # in float64 the draw 0.9 is the threshold itself: unchanged, and nothing is ambiguous
    call64 = Call((call.args[0], np.zeros((1, 3)), np.array([[0.9, 0.5, 0.95]]), *call.args[3:]))
    ref64 = lmspec.mlm_mask(*call64.args)[0]
    assert ref64.tolist() == [[5, 99, 7]]
    ok, _, msg = ct.compare_mlm_mask(call64, ref64, np.array([[1, 99, 7]]), "float64",
                                     _tol("float64"))
    assert not ok and msg == "inputs[0,0]=1, but should be 5"


def test_sample_compare_accepts_neighbours_only_at_ambiguous_decisions():
    x = np.log(np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    u = np.array([0.5, 0.2])  # the first row's u sits on the edge between tokens 0 and 1
    call = Call((x, u), {"temperature": 1.0, "top_k": 0, "top_p": 1.0})
    ref = lmspec.sample_token(x, u)
    assert ref[1] == 0
    ok, amb, _ = ct.compare_sample_token(call, ref, np.array([1 - ref[0], 0]), "float64",
                                         _tol("float64"))
    assert ok and amb == 1
    ok, amb, msg = ct.compare_sample_token(call, ref, np.array([ref[0], 1]), "float64",
                                           _tol("float64"))
    assert not ok and msg == "ids[1]=1, but should be 0"
    greedy = Call((x, u), {"temperature": 0.0, "top_k": 0, "top_p": 1.0})
    assert not ct.compare_sample_token(greedy, np.array([0, 0]), np.array([0, 1]), "float64",
                                       _tol("float64"))[0]


def test_sample_candidates_cover_ties_and_the_nucleus_edge():
    eps = 1e-12
    assert ct.sample_candidates(np.zeros(4), 0.1, 1.0, 1, 1.0, eps) == {0}  # exact: id order
    near = np.array([0.0, 1e-13, -1e-13, 5e-14])  # tied within eps, but not equal
    assert ct.sample_candidates(near, 0.1, 1.0, 1, 1.0, eps) == {0, 1, 2, 3}
    x = np.log(np.array([0.5, 0.3, 0.2]))
    assert ct.sample_candidates(x, 0.9, 1.0, 0, 0.7, eps) == {1}  # kept {0.5, 0.3}
    _, ps = tr.sorted_probs(x[None], 1.0)
    edge = float(ps[0, 0] + ps[0, 1])  # top_p on the mass of the first two: keep 2 or 3
    assert ct.sample_candidates(x, 0.9, 1.0, 0, edge, eps) == {1, 2}
    assert ct.sample_candidates(x, 0.3, 1.0, 0, edge, eps) == {0}



def _sample_torch(logits, u, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, *,
                  max_before_renormalising=False):
    """sample_token in torch, in the logits' dtype: sort ``softmax(logits/T)``, keep the
    top k and renormalise, the top-p prefix and renormalise, then the tokens with
    ``p ≥ min_p·max p`` (the renormalised largest, or with the bug the largest before the
    top-k/top-p renormalisation) and renormalise; the inverse CDF at ``u``."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    p, order = torch.sort(torch.softmax(logits / temperature, -1), dim=-1, descending=True,
                          stable=True)
    rank = torch.arange(p.shape[-1])
    before = p[:, :1].clone()

    def renormalised(q, keep):
        q = torch.where(keep, q, torch.zeros_like(q))
        return q / q.sum(-1, keepdim=True)

    p = renormalised(p, rank < (top_k or p.shape[-1]))
    if top_p < 1:
        p = renormalised(p, (torch.cumsum(p, -1) - p < top_p) | (rank == 0))
    if min_p > 0:
        largest = before if max_before_renormalising else p[:, :1]
        p = renormalised(p, (p >= min_p * largest) | (rank == 0))
    cum = torch.cumsum(p, -1)
    pick = torch.minimum(torch.searchsorted(cum, u[:, None].to(cum.dtype), right=True)[:, 0],
                         (p > 0).sum(-1) - 1)
    return order.gather(-1, pick[:, None])[:, 0]


def _min_p_max_before_renormalising(logits, u, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    return _sample_torch(logits, u, temperature, top_k, top_p, min_p,
                         max_before_renormalising=True)


@pytest.mark.parametrize("seed", range(5))
def test_min_p_edge_draws_catch_the_max_before_renormalising(seed):
    """The min-p edge family of the strategy (rows whose runner-up sits just outside or
    inside ``min_p×`` the largest, behind a top-k cut): at the default profile's 30
    examples the mutant taking the largest probability before the top-k/top-p
    renormalisation fails on every seed, and the correct version passes."""
    from tests.conftest import MutantBackend, run_checks

    for fn, want in ((_min_p_max_before_renormalising, "fail"), (_sample_torch, "pass")):
        results = run_checks(MutantBackend({"sample_token": fn}), "sample_token",
                             ("float32", "float64"), ("forward",), max_examples=30, seed=seed)
        assert [r["status"] for r in results] == [want] * 2, [r["message"] for r in results]


# -- low precision (float16 / bfloat16): the torch backend and the strategies ---------------

LOWP = TorchBackend("torch-cpu-lowp", "cpu", ("float16", "bfloat16"))
F16 = np.float16


def test_backend_sampling_does_not_overflow_logits_over_temperature_in_float16():
    # 66/0.001 = 66000 is beyond float16's 65504: softmax(logits/T) would be NaN
    x, u = np.array([[66.0], [66.0]], F16), np.array([0.0, 0.5], F16)
    assert LOWP.sample_token(x, u, temperature=1e-3).tolist() == [0, 0]
    x2 = np.array([[60.0, 66.0, -66.0]], F16)  # differences/T overflow to −inf: p = 0
    for kw in ({"temperature": 1e-3}, {"temperature": 1e-3, "top_k": 1}):
        assert LOWP.sample_token(x2, np.array([0.9], F16), **kw).tolist() == [1]


def test_backend_distillation_in_float16_shifts_before_dividing_and_masks_zero_p():
    s, y = np.array([[0.0]], F16), np.array([0])
    t = np.array([[3276.0]], F16)  # 3276/0.05 = 65520 rounds to inf in float16
    kw = {"temperature": 0.05, "alpha": 0.0}
    assert float(LOWP.distillation_loss(s, t, y, **kw)) == 0.0
    grads = LOWP.vjp("distillation_loss", (s, t, y), kw, np.array(1.0, F16))
    assert all(np.all(g == 0) for g in grads[:2])
    # the teacher's (−3400)/0.05 overflows to −inf, p = 0 there: the spec counts the term
    # 0, F.kl_div gives 0·∞ = NaN (declared: distillation_nan_terms)
    s, t = np.array([[0.0, 0.0]], F16), np.array([[-1700.0, 1700.0]], F16)
    got = float(LOWP.distillation_loss(s, t, np.array([1]), **kw))
    want = float(lmspec.distillation_loss(s.astype(float), t.astype(float), np.array([1]), **kw))
    assert np.isnan(got) and np.isfinite(want)
    assert tt.distillation_nan_terms((s, t, np.array([1])), kw)
    assert any(d.applies is not None and d.applies((s, t, np.array([1])), kw)
               for d in LOWP.deviations["distillation_loss/forward/float16"])


def test_torch_clip_in_float16_turns_zero_gradients_into_nan_as_documented():
    # the upstream behaviour behind deviation (3); if torch fixes it, drop the deviation
    param = torch.zeros(3, dtype=torch.float16)
    param.grad = torch.zeros(3, dtype=torch.float16)
    torch.nn.utils.clip_grad_norm_([param], 0.0)
    assert torch.isnan(param.grad).all()
    clip = LOWP.deviations["clip_grad_norm"]
    assert "reciprocal" in clip.reason and "(3) in float16" in clip.reason
    zeros = (np.zeros(3, F16),)
    assert clip.applies((zeros, 0.0), {})
    assert any(d.applies is not None and d.applies((zeros, 0.0), {})
               for d in LOWP.deviations["clip_grad_norm/forward/float16"])


def test_distillation_temperatures_keep_log_probabilities_in_range():
    big = np.array([[3276.0, 0.0]], F16)
    assert 0.05 not in ct._temperatures("float16", big, big)
    assert 0.5 in ct._temperatures("float16", big, big)
    assert ct._temperatures("bfloat16", big.astype(np.float64)) == list(ct.TEMPERATURES)
    assert ct._temperatures("float16", np.zeros((1, 3), F16)) == list(ct.TEMPERATURES)


def test_grid_property_skips_cuts_inside_a_rounding_tie():
    # 0 vs 0.0006 at T = 3 differ by 1e-4 in probability: below float16's resolution, but
    # float16 logits are exact and the probabilities are computed in float32 (CONTRACT §6),
    # so the float16 property resolves the cut at float32's floor and skips only closer ones
    near = np.array([0.0, 0.0006, 0.0006])
    _, margin = ct._filtered_np(near, 3.0, 0, 0.0)
    scale = ct._probability_scale(near, 3.0)
    assert margin <= floor("float16", 3, scale, "float16")
    assert margin > floor("float16", 3, scale) == floor("float32", 3, scale)
    assert margin > floor("float64", 3, 1.0)
    # equal logits are ordered by id exactly in any dtype: no ambiguity at that cut
    q, margin = ct._filtered_np(np.array([0.0, 0.0, -1.0]), 1.0, 1, 1.0)
    assert q.tolist() == [1.0, 0.0, 0.0] and margin > 0.2


def test_torch_kl_div_backward_overflows_in_float16_as_documented():
    # cot·(t − input) = 56.25·1166 > 65504 before exp(t) = 0.5 brings it back in range
    lq = torch.tensor([[0.0, -1166.0]], dtype=torch.float16, requires_grad=True)
    lp = torch.tensor([[-0.6931, -0.6931]], dtype=torch.float16, requires_grad=True)
    F.kl_div(lq, lp, reduction="none", log_target=True).backward(
        torch.full((1, 2), 56.25, dtype=torch.float16))
    assert torch.isinf(lp.grad[0, 1]) and 56.25 * 0.5 * 1167 < 65504
    bound, *predicates = LOWP.deviations["distillation_loss/vjp/float16"]
    assert bound.bound == "float16"
    assert any("65504" in d.reason and d.applies is not None for d in predicates)
