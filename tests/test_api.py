"""lmspec.check / assert_conforms / assert_close and the framework adapters."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import lmspec
from lmspec.conformance.harness import Settings, Target, run_target


def softmax(x, axis=-1):
    """The textbook softmax; half-precision inputs computed in float32 and the result
    rounded back (CONTRACT §6); a one-element axis is 1 whatever its value."""
    if x.shape[axis] == 1:
        return np.ones_like(x)
    w = x if x.dtype == np.float64 else x.astype(np.float32)
    e = np.exp(w - w.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(x.dtype)


def softmax_vjp(op, args, kwargs, cot):
    (x,) = args
    p = softmax(x, kwargs.get("axis", -1))
    return (p * (cot - (cot * p).sum(axis=kwargs.get("axis", -1), keepdims=True)),)


def no_shift(x, axis=-1):
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def by_check(results):
    return {(r["dtype"], r["check"]): r for r in results}


def test_importing_lmspec_stays_cheap_and_the_api_is_lazy():
    code = ("import sys, lmspec; assert 'hypothesis' not in sys.modules; "
            "assert callable(lmspec.check) and callable(lmspec.assert_close); "
            "assert 'hypothesis' in sys.modules and 'torch' not in sys.modules; "
            "assert lmspec.adapters.torch and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_runs_forward_vjp_and_properties_on_a_bare_callable():
    res = by_check(lmspec.check("softmax", softmax, dtypes=["float32"], vjp=softmax_vjp,
                                max_examples=10))
    assert set(res) == {("float32", c) for c in ("forward", "vjp", "rows_sum_to_one",
                                                 "shift_invariance")}
    assert all(r["status"] == "pass" and r["examples"] == 10 for r in res.values())
    assert res[("float32", "forward")]["backend"] == "softmax"


def test_without_a_vjp_the_vjp_check_is_unsupported():
    (r,) = lmspec.check("softmax", softmax, dtypes=["float64"], checks=["vjp"])
    assert r["status"] == "unsupported" and "no vjp" in r["message"]


def test_a_property_that_needs_another_op_is_unsupported_not_judged_on_the_reference():
    def log_softmax(x, axis=-1):
        return np.log(softmax(x, axis))

    (r,) = lmspec.check("log_softmax", log_softmax, dtypes=["float64"],
                        checks=["exp_is_softmax"], max_examples=5)
    assert r["status"] == "unsupported"
    assert "does not implement softmax" in r["message"]


def test_check_draws_the_examples_of_lmspec_run():
    """Same seed, op, dtype and check: the same search as the harness on a backend."""

    class Backend:
        name, device, dtypes = "b", "cpu", ("float32",)

        def logsumexp(self, x, axis=-1):
            return np.log(np.exp(x).sum(axis=axis))  # no shift: overflows

    ours = lmspec.check("logsumexp", Backend().logsumexp, dtypes=["float32"],
                        checks=["forward"], max_examples=20, seed=3)[0]
    theirs = run_target(Backend(), Target("b", "logsumexp", "float32", "forward"),
                        Settings(max_examples=20, seed=3))
    assert ours["status"] == theirs["status"] == "fail"
    assert ours["counterexample"] == theirs["counterexample"]
    assert ours["reproduce"].startswith("lmspec.check('logsumexp', logsumexp, dtypes=")


def test_assert_conforms_gives_verdict_tolerance_and_a_runnable_counterexample():
    with pytest.raises(AssertionError) as info:
        lmspec.assert_conforms("softmax", no_shift, dtypes=["float32"], checks=["forward"])
    text = str(info.value)
    assert "no_shift does not conform to lmspec's softmax (1 of 1 checks failed)" in text
    assert "softmax float32 forward: fail" in text and "NaN/inf positions must match" in text
    assert "tolerance: max|b-r| <= 2*max|baseline-r|" in text and "u=5.96e-08" in text
    assert "dtype=np.float32" in text
    snippet = text.split("runnable:\n", 1)[1].split("\n  replay:")[0]
    source = "\n".join(line[6:] for line in snippet.splitlines())
    with pytest.raises(AssertionError, match="does NOT conform"), np.errstate(all="ignore"):
        exec(source, {"no_shift": no_shift})  # the snippet replays the failure


def test_assert_conforms_returns_the_records_when_everything_conforms():
    res = lmspec.assert_conforms("softmax", softmax, dtypes=["float64"], max_examples=5)
    assert {r["status"] for r in res} == {"pass", "unsupported"}


def test_assert_close_gives_the_tolerance_of_one_call():
    x = np.linspace(-4, 4, 12, dtype=np.float32).reshape(3, 4).astype(lmspec.DTYPES["bfloat16"])
    good = softmax(x.astype(np.float64)).astype(lmspec.DTYPES["bfloat16"])
    v = lmspec.assert_close("softmax", (x,), {"axis": -1}, good, "bfloat16")
    assert v.ok and v.outputs[0].k == 4 and v.outputs[0].ratio <= 1
    # the output's rounding u·max|r| with bfloat16's u, plus twice the baseline's error
    # (float32 intermediates rounded once), plus a floor at float32's u: far below the
    # all-bfloat16 model's 4·√k·u·max|x| = 0.125 (CONTRACT §6)
    top = float(np.abs(good.astype(np.float64)).max())
    assert 2.0**-8 * top <= v.tolerances["out"] < 4 * 2.0**-8 * top
    with pytest.raises(AssertionError, match="does NOT conform"):
        lmspec.assert_close("softmax", (x,), {"axis": -1}, good.astype(np.float64) + 0.2,
                            "bfloat16")


def test_assert_close_refuses_inputs_the_kernel_cannot_have_seen():
    x = np.array([0.1, 0.2], dtype=np.float64)
    with pytest.raises(ValueError, match="not exactly representable in float32"):
        lmspec.assert_close("softmax", (x,), {}, softmax(x), "float32")
    v = lmspec.assert_close("softmax", (np.array([0.5, 1.0]),), {}, softmax(np.array([.5, 1.])),
                            "float32")  # exactly representable: converted
    assert v.ok


def test_the_torch_adapter_converts_bfloat16_and_takes_gradients_by_autograd():
    torch = pytest.importorskip("torch")

    def torch_softmax(x, axis=-1):  # torch.softmax of one -inf is NaN; §6 says 1
        if x.shape[axis] == 1:
            return torch.ones_like(x) + 0 * x.nan_to_num()
        return torch.softmax(x.float(), dim=axis).to(x.dtype)

    f = lmspec.adapters.torch(torch_softmax)
    res = by_check(lmspec.check("softmax", f, dtypes=["bfloat16"], checks=["forward", "vjp"],
                                max_examples=8))
    assert [r["status"] for r in res.values()] == ["pass", "pass"]
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    (g,) = f.vjp("softmax", (x,), {"axis": -1}, np.array([[1.0, 0.0]], np.float32))
    (want,) = lmspec.vjp("softmax", (x.astype(float),), {"axis": -1}, np.array([[1.0, 0.0]]))
    np.testing.assert_allclose(g, want, rtol=1e-6)


@pytest.mark.slow
def test_the_jax_adapter():
    jax = pytest.importorskip("jax")
    f = lmspec.adapters.jax(lambda x, axis=-1: jax.nn.softmax(x, axis=axis))

    def one_neg_inf(args, kwargs):  # jax.nn.softmax of a lone -inf is NaN; §6 says 1
        x, axis = args[0], kwargs.get("axis", -1)
        return x.shape[axis] == 1 and bool(np.isneginf(x.astype(np.float64)).any())

    found = lmspec.Deviation("jax.nn.softmax over a one-element axis holding -inf is NaN",
                             applies=one_neg_inf)
    res = lmspec.check("softmax", f, dtypes=["float64"], checks=["forward", "vjp"],
                       max_examples=5, deviations={"softmax/forward": found})
    assert [r["status"] for r in res][1] == "pass"
    assert res[0]["status"] in ("pass", "deviation")
    assert res[0]["status"] == "pass" or res[0]["deviation"]["predicate"]
