"""The tolerance policy and the harness's own guards."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from hypothesis import strategies as st

from lmspec._precision import UNIT_ROUNDOFF
from lmspec.conformance import tolerance
from lmspec.conformance.conditioning import (
    checkerboard,
    exponent_error,
    perturbed_reference,
    scalar_step,
)
from lmspec.conformance.declare import CASES, Call, OpCases
from lmspec.conformance.draw import below_one
from lmspec.conformance.harness import Settings, Target, reference, run_target

U32 = 2.0**-24


def test_floor_grows_with_sqrt_k_and_magnitude():
    assert tolerance.floor("float32", 4, 3.0) == 4.0 * 2 * U32 * 3.0
    assert tolerance.floor("float64", 1, 0.0) == 4.0 * 2.0**-53  # M = 0 counts as 1


def test_compare_accepts_rounding_and_rejects_more():
    ref = np.array([1.0, 0.5, -2.0])
    assert tolerance.compare("out", ref * (1 + U32), ref, None, "float32", 1).ok
    v = tolerance.compare("out", ref * (1 + 1e3 * U32), ref, None, "float32", 1)
    assert not v.ok and v.ratio > 1 and v.message.startswith("out[2]=")


def test_baseline_gate_and_measured_conditioning():
    ref = np.array([1.0])
    got = ref + 1e-4
    assert not tolerance.compare("out", got, ref, None, "float32", 1).ok
    assert tolerance.compare("out", got, ref, ref + 1e-4, "float32", 1).ok  # baseline as bad
    # an exact 0 that the inputs' rounding moves by 1e-9: the floor follows
    zero = np.array([0.0])
    assert not tolerance.compare("out", zero + 1e-9, zero, None, "float64", 1).ok
    assert tolerance.compare("out", zero + 1e-9, zero, None, "float64", 1,
                             perturbed=zero + 1e-9).ok


def test_special_values_must_match_but_overflow_may_round():
    ref = np.array([np.nan, np.inf, 1.0])
    assert tolerance.compare("out", ref.copy(), ref, None, "float32", 1).ok
    v = tolerance.compare("out", np.array([0.0, np.inf, 1.0]), ref, None, "float32", 1)
    assert not v.ok and "NaN/inf positions must match" in v.message
    big = np.array([1e39])  # beyond float32: inf is the correctly rounded answer
    assert tolerance.compare("out", np.array([np.inf]), big, None, "float32", 1).ok
    assert not tolerance.compare("out", np.array([-np.inf]), big, None, "float32", 1).ok
    assert math.isinf(tolerance.compare("out", np.ones(2), np.ones(3), None, "float32", 1).ratio)


def test_a_strategy_that_widens_the_dtype_is_a_harness_error(monkeypatch):
    """NumPy silently widens bfloat16 (np.clip): the harness says so instead of blaming
    the backend."""
    wrong = OpCases("softmax", lambda dtype: st.just(Call((np.ones(3, np.float64),), {})),
                    lambda call: 3)
    monkeypatch.setitem(CASES, "softmax", wrong)

    class B:
        name, device, dtypes = "b", "cpu", ("float32",)

        def softmax(self, x, axis=-1):
            return x

    r = run_target(B(), Target("b", "softmax", "float32", "forward"), Settings(max_examples=3))
    assert r["status"] == "error" and r["message"].startswith("harness: the strategy of softmax")


# -- the measured conditioning (conformance.conditioning) -------------------------------

def _sensitivity(op: str, call: Call, dtype: str, evaluations=None) -> float:
    """``max|r̃ − r| / u`` over the perturbed evaluations (the measured part of ``M``)."""
    ref = np.asarray(reference(op, call), dtype=np.float64)
    evals = perturbed_reference(op, call, dtype) if evaluations is None else evaluations
    dist = [float(np.max(np.abs(np.asarray(q) - ref))) for q in evals if q is not None]
    return max(dist, default=0.0) / UNIT_ROUNDOFF[dtype]


def test_shift_invariant_ops_are_measured_in_directions_they_feel():
    """A row of equal logits, or a near-constant row of a layer norm: a perturbation of
    constant sign along the row leaves them unmoved, the componentwise ones (random signs,
    and their product with a checkerboard) do not."""
    for shape in [(1, 2), (3, 1, 2), (2, 5)]:
        board = checkerboard(shape)
        assert np.all(np.abs(np.diff(board, axis=-1)) == 2)  # alternates along each axis
        assert np.all(np.abs(np.diff(board, axis=0)) == 2) if shape[0] > 1 else True
    row = Call((np.array([[5.0, 5.0]]),), {})
    assert _sensitivity("softmax", row, "float64") >= 0.25 * 5  # p(1 − p)·2·|x|
    near = Call((np.array([[1e4, 1e4 + 1.0]]), np.ones(2), np.zeros(2)), {"eps": 1e-5})
    assert _sensitivity("layer_norm", near, "float64") > 1e4  # ∝ |x|/σ


def test_scalar_hyperparameters_move_by_their_float32_and_dtype_rounding():
    assert scalar_step(1.7, "float64", "scale") == abs(1.7 - float(np.float32(1.7)))
    assert scalar_step(1.7, "float64", "max_norm") == 1.7 * 2.0**-53  # data, not an attribute
    assert scalar_step(1e-5, "float16") == abs(1e-5 - float(np.float16(1e-5)))  # subnormal
    assert scalar_step(0.5, "float32") == 0.5 * U32
    # eps alone: an all-zero input's layer norm moves only through beta (not at all) …
    flat = Call((np.zeros((1, 3)), np.ones(3), np.zeros(3)), {"eps": 1e-5})
    assert _sensitivity("layer_norm", flat, "float64") == 0.0
    # … while a row with variance ≈ eps feels eps held in float32
    small = Call((np.array([[0.0, 3e-3]]), np.ones(2), np.zeros(2)), {"eps": 1e-5})
    assert _sensitivity("layer_norm", small, "float64") > 1e6


def test_the_p_norm_exponent_rounding_is_in_the_floor():
    """``np.linalg.norm([1e30], 3)`` is 34 u low in float64 (``fl(1/3) ≠ 1/3``): within the
    floor once the exponent's rounding is measured, beyond it with the data alone."""
    assert exponent_error(3.0, "float64") == float(Fraction(1, 3) - Fraction(1 / 3))
    assert exponent_error(2.0, "float32") == exponent_error(math.inf, "float32") == 0.0
    g = (np.array([1e30]),)
    call = Call((g,), {"max_norm": 0.5, "norm_type": 3.0})
    total = np.linalg.norm(g[0], 3)
    got, ref = np.float64(total), 1e30
    evals = perturbed_reference("clip_grad_norm", call, "float64")
    tol = [tolerance.compare("total", got, ref, None, "float64", 1,
                             perturbed=[None if q is None else q[1] for q in e])
           for e in (evals[:4], evals)]
    assert not tol[0].ok and tol[0].ratio > 3
    assert tol[1].ok and tol[1].ratio < 0.5


def test_measured_conditioning_is_deterministic_and_skips_what_it_cannot_use():
    x = Call((np.array([[1.0, -2.0, 0.5]]),), {})
    a, b = perturbed_reference("softmax", x, "float32"), perturbed_reference("softmax", x,
                                                                               "float32")
    assert len(a) == 4 and all(np.array_equal(p, q) for p, q in zip(a, b))
    # integer-valued ops compare exactly; no float data, nothing to perturb
    ids = np.zeros((1, 1), np.int64)
    assert perturbed_reference("mlm_mask", Call((ids,) * 7), "float32") == []
    # a scalar pushed out of its domain (alpha = 1 + u) is retried unmoved
    s = np.array([[1.0, 2.0]])
    call = Call((s, s, np.array([0])), {"temperature": 1.0, "alpha": 1.0})
    assert all(e is not None for e in perturbed_reference("distillation_loss", call, "float32"))


def test_uniform_draws_stay_below_one_in_every_dtype():
    grid = (np.arange(256) + 0.5) / 256
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        u = below_one(grid, dtype).astype(np.float64)
        assert u.max() < 1 and np.all(np.diff(u) >= 0)
