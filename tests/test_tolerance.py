"""The tolerance policy and the harness's own guards."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lmspec import OPS as lmspec_ops
from lmspec import vjp as lmspec_vjp
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


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_lazy_conditioning_gives_the_eager_verdict(data):
    """Measuring only when the error exceeds MEASURED_ABOVE of the unmeasured tolerance
    changes no verdict and no ratio above it; below, the ratio is an upper bound."""
    dtype = data.draw(st.sampled_from(["float16", "float32", "float64"]))
    n = data.draw(st.integers(1, 4))
    vals = st.floats(-4, 4, allow_nan=False)
    ref = np.array(data.draw(st.lists(vals, min_size=n, max_size=n)))
    err = 10.0 ** data.draw(st.floats(-20, 0)) * np.array(
        data.draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n)))
    base = ref + data.draw(st.sampled_from([0.0, 1e-6, 1e-3]))
    pert = ref + 10.0 ** data.draw(st.floats(-20, 1)) * data.draw(st.sampled_from([0, 1]))
    k = data.draw(st.integers(1, 64))
    calls = []

    def lazy():
        calls.append(1)
        return [pert]

    args = ("out", ref + err, ref, base, dtype, k)
    eager = tolerance.compare(*args, perturbed=[pert])
    lazily = tolerance.compare(*args, perturbed=lazy)
    assert lazily.ok == eager.ok and len(calls) == int(lazily.measured) <= 1
    if lazily.measured or eager.ratio > tolerance.MEASURED_ABOVE:
        assert lazily.measured and (lazily.ratio, lazily.tol) == (eager.ratio, eager.tol)
    else:
        assert eager.ratio <= lazily.ratio <= tolerance.MEASURED_ABOVE


def test_lazy_conditioning_measures_only_when_the_error_needs_it():
    ref, calls = np.array([1.0, -2.0]), []

    def lazy():
        calls.append(1)
        return [ref * (1 + 1e6 * U32)]  # an ill-conditioned output: M grows 1e6-fold

    quiet = tolerance.compare("out", ref * (1 + U32 / 8), ref, None, "float32", 1,
                              perturbed=lazy)
    assert quiet.ok and not quiet.measured and calls == []
    loud = tolerance.compare("out", ref * (1 + 1e3 * U32), ref, None, "float32", 1,
                             perturbed=lazy)
    assert loud.ok and loud.measured and calls == [1]  # fails without the measurement
    assert not tolerance.compare("out", ref * (1 + 1e3 * U32), ref, None, "float32", 1).ok


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


def _window_saturated() -> tuple[Call, np.ndarray]:
    """The jax-cpu counterexample: ``window_lm`` with its hidden ``tanh`` saturated
    (pre-activations −19.38 and −26.29, whose ``tanh`` rounds to exactly −1 in float64)."""
    ctx = np.array([[0], [0]])
    E = np.array([[-3.0, -1.3812797174167781], [-2.7541588563828316, -2.9008341868288254],
                  [1.879621435201635, 2.47653346366633], [0.6398146546030792, 1.37697936590399],
                  [0.261749948792537, 2.610434542726609]])
    W1 = np.array([[6.0, 1.0], [6.0, 6.0]])
    W2 = np.array([[1.6435402478574517, -2.7625594348335563],
                   [-5.508317712765663, -5.801668373657651],
                   [3.75924287040327, 4.95306692733266],
                   [1.2796293092061584, 2.7539587318079803],
                   [0.523499897585074, 5.220869085453218]])
    cot = np.array([[0.047286498801026866, 1.8018547853037412, -1.423361549121465,
                     1.7945977885489754, -0.7526741919580582],
                    [-0.3066942041096974, 1.310810375281767, -0.3632034545233549,
                     0.19837475069223798, -1.8897635470277265]])
    return Call((ctx, E, W1, np.zeros(2), W2, None, np.zeros(5))), cot


def test_a_saturated_tanh_rounded_as_xla_rounds_it_conforms():
    """``∂E`` of ``window_lm`` computed, as every engine does, from ``1 − hid²``, with
    XLA's float64 ``tanh`` on the CPU: ``tanh(−19.38) = −1 + 7·2⁻⁵³`` (the exact value is
    ``−1 + 2.7e-17``; ``tanh(−26.29) = −1``). Input perturbations cannot move a saturated
    ``tanh``, so without the activations' rounding the floor is too narrow (this is how
    jax-cpu failed); with it, one rounding of ``tanh`` measured and the floor's ``C·√k``
    of them allowed, it conforms — and a gradient off by 100 times as much still fails."""
    call, cot = _window_saturated()
    ctx, E, W1, b1, W2, _, _ = call.args
    x = E[ctx].reshape(2, -1)
    hid = np.tanh(x @ W1.T + b1)
    hid[:, 0] += 7 * 2.0**-53  # XLA's value; hid[:, 1] stays −1 in XLA as well
    dx = ((cot @ W2) * (1 - hid * hid)) @ W1
    got = np.zeros_like(E)
    np.add.at(got, ctx[:, 0], dx)
    ref = np.asarray(lmspec_vjp("window_lm", call.args, {}, cot)[1])
    assert not ref.any() and abs(got[0, 0]) > 2e-13  # jax-cpu gave −2.156e-13
    oc = CASES["window_lm"]
    k, scale = oc.k(call), oc.scale(call, cot)
    evals = perturbed_reference("window_lm", call, "float64", cot)
    assert len(evals) == 5

    def verdict(g, perturbed):
        return tolerance.compare("grad E", g, ref, None, "float64", k, scale,
                                 perturbed=[None if q is None else q[1] for q in perturbed])

    assert not verdict(got, evals[:4]).ok
    assert verdict(got, evals).ok
    assert not verdict(100 * got, evals).ok


def test_activated_lists_exactly_the_ops_whose_reference_moves_activations():
    """Every op of ``ACTIVATED`` passes some ``tanh``/``σ`` output through
    ``lmspec._precision.activation`` on its conformance inputs; no other op ever does."""
    import warnings

    from hypothesis import HealthCheck, given, settings

    from lmspec._precision import rounding_activations
    from lmspec.conformance.conditioning import ACTIVATED
    from lmspec.conformance.harness import map_arrays as _map
    from lmspec.conformance.harness import op_kwargs as _op_kwargs
    from lmspec.conformance.harness import widen as _widen

    def moves(op: str, oc: OpCases) -> bool:
        hits: list[int] = []

        @settings(max_examples=15, database=None, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(oc.strategy("float64"))
        def probe(call: Call) -> None:
            with rounding_activations(-(2.0**-53)) as r, np.errstate(all="ignore"):
                try:
                    lmspec_ops[op].reference(*_map(call.args, _widen),
                                             **_op_kwargs(op, call, "float64"))
                except ValueError:
                    return
            hits.append(r.hits)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe()
        return any(hits)

    moved = {op for op, oc in CASES.items() if moves(op, oc)}
    assert moved == set(ACTIVATED)


# -- half precision: float32 intermediates, the output rounded once (CONTRACT §6) ---------

BF16 = "bfloat16"


def _bf16(a) -> np.ndarray:
    from lmspec._precision import DTYPES

    return np.asarray(a, dtype=np.float64).astype(DTYPES[BF16])


def test_half_dtypes_work_in_float32_and_add_only_their_output_rounding():
    assert tolerance.working_precision("float16") == "float32"
    assert tolerance.working_precision(BF16) == "float32"
    assert tolerance.working_precision("float32") == "float32"
    with tolerance.declared_precision({"float32": "tf32"}):
        assert tolerance.working_precision("float32") == "tf32"
        with tolerance.declared_precision({BF16: BF16}):  # stacks on the enclosing block
            assert tolerance.working_precision(BF16) == BF16
            assert tolerance.working_precision("float32") == "tf32"
    assert tolerance.output_rounding(BF16, "float32", 2.0) == 2.0 * 2.0**-8
    assert tolerance.output_rounding("float32", "float32", 2.0) == 0.0
    assert tolerance.output_rounding(BF16, BF16, 2.0) == 0.0  # in the floor already


def test_a_uniform_bfloat16_softmax_fails_where_the_all_half_model_admitted_it():
    """The issue's case: exact ≈ [0, 0, 0, 1]; the all-bfloat16 model charged u·|x| = 0.16
    to the logits and gave a tolerance of 1.25 on probabilities."""
    import lmspec

    x = _bf16([[1, 2, 3, 40]])
    bad = np.full((1, 4), 0.25)
    try:
        lmspec.assert_close("softmax", (x,), {}, bad, BF16)
    except AssertionError as exc:
        assert "does NOT conform" in str(exc)
    else:
        raise AssertionError("a uniform answer passed")
    good = lmspec.softmax(x.astype(np.float64)).astype(_bf16(0).dtype)
    v = lmspec.assert_close("softmax", (x,), {}, good, BF16)
    assert v.ok and v.tolerances["out"] < 2 * 2.0**-8  # about one rounding of 1


def test_half_rounding_in_an_intermediate_fails_where_it_shows_and_not_elsewhere():
    """rms_norm of a row whose mean square needs float32: a kernel that accumulates
    x² in bfloat16 (rounding every partial sum) errs by many ulps of the output; the
    same formula accumulated in float32 and rounded once passes."""
    import lmspec

    rng = np.random.default_rng(0)
    x = _bf16(rng.normal(size=(1, 512)) + 3.0)
    w = _bf16(np.ones(512))

    def rms(acc_dtype):
        acc = np.zeros((1,), dtype=acc_dtype)
        for j in range(x.shape[1]):  # sequential accumulator, rounded each step
            acc = (acc + x[:, j].astype(acc_dtype) ** 2).astype(acc_dtype)
        ms = acc.astype(np.float32) / np.float32(x.shape[1])
        return (x.astype(np.float32) / np.sqrt(ms + np.float32(1e-6))[:, None]).astype(x.dtype)

    good, bad = rms(np.float32), rms(x.dtype)
    assert lmspec.assert_close("rms_norm", (x, w), {"eps": 1e-6}, good, BF16).ok
    try:
        lmspec.assert_close("rms_norm", (x, w), {"eps": 1e-6}, bad, BF16)
    except AssertionError:
        pass
    else:
        raise AssertionError("a bfloat16 accumulator of 512 squares passed")


def test_the_half_baseline_is_computed_in_float32_and_rounded_to_the_dtype():
    from lmspec.conformance.harness import baseline

    x = _bf16([[0.1, 0.2, 0.3]])
    base = baseline("softmax", Call((x,), {"axis": -1}), BF16)
    assert np.all(base == base.astype(x.dtype).astype(np.float64))  # rounded to bfloat16
    f32 = np.exp(x.astype(np.float32) - x.astype(np.float32).max())
    assert np.array_equal(base, (f32 / f32.sum()).astype(x.dtype).astype(np.float64))
    # a deviation's working precision judges at that precision instead
    all_half = baseline("softmax", Call((x,), {"axis": -1}), BF16, working=BF16)
    assert all_half is not None and all_half.shape == base.shape
