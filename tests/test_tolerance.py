"""The tolerance policy and the harness's own guards."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from lmspec.conformance import tolerance
from lmspec.conformance.declare import CASES, Call, OpCases
from lmspec.conformance.harness import Settings, Target, run_target

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
