"""Deviations are narrow and bounded (CONTRACT §3, 2026-12-06): plain strings and
unbounded whole-check deviations are refused at load, ``op/*/dtype`` keys match every
check of one dtype, an example outside a predicate or beyond a bound is judged as usual,
and a bug injected into a copy of a built-in backend inside one of its declared
deviations' checks still fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest

import lmspec
from lmspec.backends.host import deviation_descriptor
from lmspec.conformance import harness
from lmspec.conformance.harness import Settings, Target, run_target

pytestmark = pytest.mark.filterwarnings("ignore")


class Softmax:
    """A softmax that is correct, or off by a chosen amount, on chosen examples."""

    name, device, dtypes = "dev-knobs", "cpu", ("float32", "float64")

    def __init__(self, error=lambda x: 0.0, deviations=None, in_float32=False):
        self._error, self._f32 = error, in_float32
        self.deviations = deviations or {}

    def softmax(self, x, axis=-1):
        if self._f32:  # the whole op computed in float32, returned in the input dtype
            return lmspec.softmax(x.astype(np.float32), axis).astype(np.float32).astype(x.dtype)
        return (lmspec.softmax(x, axis) + self._error(x)).astype(x.dtype)


def _run(b: Softmax, dtype: str = "float64", check: str = "forward", n: int = 40) -> dict:
    return run_target(b, Target(b.name, "softmax", dtype, check), Settings(max_examples=n),
                      b.deviations)


# -- refused at load ---------------------------------------------------------------------

def test_a_plain_string_deviation_is_refused_with_a_message_that_says_why():
    with pytest.raises(ValueError, match="neither a predicate nor a bound") as exc:
        deviation_descriptor("softmax/forward", "the engine differs")
    assert "lmspec.Deviation(reason, applies=..., bound=...)" in str(exc.value)
    with pytest.raises(ValueError, match="neither"):
        lmspec.Deviation("no predicate, no bound")


@pytest.mark.parametrize("bound", [1.0, 0.5, float("inf"), "float8", True])
def test_a_bound_that_is_no_ratio_above_1_nor_a_working_precision_is_refused(bound):
    with pytest.raises(ValueError, match="bound"):
        lmspec.Deviation("why", bound=bound)


def test_keys_name_an_op_a_check_and_a_dtype_or_star():
    ok = lmspec.Deviation("why", bound=2)
    for key in ("softmax", "softmax/forward", "softmax/forward/float16", "softmax/*/bfloat16"):
        assert deviation_descriptor(key, ok)["bound"] == 2.0
    for key in ("softmax/*", "softmax/forward/float8", "no_such_op", "softmax//float16"):
        with pytest.raises(ValueError, match="deviation key"):
            deviation_descriptor(key, ok)


def test_a_plugin_declaring_a_plain_string_deviation_fails_to_load(tmp_path):
    (tmp_path / "plain_deviation_plugin.py").write_text(
        "import numpy as np\nimport lmspec\n\n"
        "class B:\n"
        "    name, device, dtypes = 'plain-deviation', 'cpu', ('float64',)\n"
        "    deviations = {'softmax/forward': 'the engine differs'}\n"
        "    def softmax(self, x, axis=-1):\n"
        "        return lmspec.softmax(x, axis)\n\n"
        "@lmspec.hookimpl\n"
        "def register_backends(register):\n"
        "    register(B())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "LMSPEC_PLUGINS": "plain_deviation_plugin", "LMSPEC_SANDBOX": "none"}
    out = subprocess.run([sys.executable, "-m", "lmspec", "backends", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    (entry,) = [b for b in json.loads(out.stdout) if b["name"] == "plain-deviation"]
    assert entry["status"].startswith("failed to load")
    assert "'softmax/forward' is refused" in entry["status"]
    assert "neither a predicate nor a bound" in entry["status"]


# -- op/*/dtype keys -------------------------------------------------------------------------

def test_star_keys_match_every_check_of_one_dtype_and_narrower_keys_win():
    star = lmspec.Deviation("f32 star", applies=lambda a, k: True)
    exact = lmspec.Deviation("exact", applies=lambda a, k: True)
    devs = {"softmax/*/float32": star, "softmax/vjp/float32": exact, "softmax": exact}
    key = harness.deviation_key
    assert key(devs, Target("b", "softmax", "float32", "forward")) == "softmax/*/float32"
    assert key(devs, Target("b", "softmax", "float32", "rows_sum_to_one")) == \
        "softmax/*/float32"
    assert key(devs, Target("b", "softmax", "float32", "vjp")) == "softmax/vjp/float32"
    assert key(devs, Target("b", "softmax", "float64", "forward")) == "softmax"
    assert key({"softmax/*/float32": star}, Target("b", "softmax", "float64", "forward")) \
        is None


def test_a_star_deviation_covers_its_dtype_only():
    wrong = Softmax(error=lambda x: 0.1, deviations={
        "softmax/*/float32": lmspec.Deviation("f32", applies=lambda a, k: True)})
    assert _run(wrong, "float32")["status"] == "deviation"
    assert _run(wrong, "float64")["status"] == "fail"


# -- predicates and bounds -------------------------------------------------------------------

def test_a_plain_string_is_never_applied_by_the_harness():
    # a backend that slipped past the loader (an in-process object) gets no excuse from it
    assert _run(Softmax(error=lambda x: 0.1,
                        deviations={"softmax/forward": "excuse me"}))["status"] == "fail"


def test_an_example_beyond_a_ratio_bound_fails_and_one_within_it_deviates():
    slightly = lambda x: 3e-15 * np.sign(x)  # noqa: E731 - a few float64 tolerances
    within = _run(Softmax(error=slightly, deviations={
        "softmax/forward": lmspec.Deviation("a few ulps", bound=1e6)}))
    assert within["status"] == "deviation", within["message"]
    beyond = _run(Softmax(error=lambda x: 0.1, deviations={
        "softmax/forward": lmspec.Deviation("a few ulps", bound=1e6)}))
    assert beyond["status"] == "fail"


def test_a_working_precision_bound_judges_as_computed_in_it():
    in_f32 = Softmax(in_float32=True)
    assert _run(in_f32)["status"] == "fail"  # float32 accuracy in float64 fails
    in_f32.deviations = {"softmax/*/float64": lmspec.Deviation("float32 inside",
                                                               bound="float32")}
    assert _run(in_f32)["status"] == "deviation"
    # a bug beyond float32 accuracy is not excused by the float32 bound
    bug = Softmax(error=lambda x: 1e-3, deviations=in_f32.deviations)
    assert _run(bug)["status"] == "fail"


def test_a_predicate_and_a_bound_together_need_both():
    dev = lmspec.Deviation("rows of 3, a few ulps", bound=1e6,
                           applies=lambda a, k: a[0].shape[-1] == 3)
    small = lambda x: 3e-15 * np.sign(x) if x.shape[-1] == 3 else 0.0  # noqa: E731
    assert _run(Softmax(error=small, deviations={"softmax": dev}))["status"] == "deviation"
    big = lambda x: 0.1 if x.shape[-1] == 3 else 0.0  # noqa: E731 - inside, beyond the bound
    assert _run(Softmax(error=big, deviations={"softmax": dev}))["status"] == "fail"
    outside = lambda x: 3e-15 * np.sign(x) if x.shape[-1] == 4 else 0.0  # noqa: E731
    assert _run(Softmax(error=outside, deviations={"softmax": dev}), n=80)["status"] == "fail"


# -- the built-in backends -------------------------------------------------------------------

def _builtin(name: str):
    import lmspec.backends.builtin as builtin

    found: list = []
    builtin.register_backends(found.append)
    return next(b for b in found if b.name == name)


@pytest.mark.parametrize("name", ["torch-cpu", "jax-cpu", "onnxruntime-cpu"])
def test_every_builtin_deviation_is_narrow_or_bounded(name):
    b = _builtin(name)
    if not b.available()[0]:
        pytest.skip(b.available()[1])
    for key, devs in b.deviations.items():
        for dev in devs if isinstance(devs, tuple) else (devs,):  # a tuple: several parts
            assert isinstance(dev, lmspec.Deviation), key
            d = deviation_descriptor(key, dev)
            assert d["predicate"] or d["bound"] is not None, key
            assert len(dev.reason) > 80, key  # the cause and its measured size


def _torch_copy(overrides: dict):
    pytest.importorskip("torch")
    from lmspec.backends.torch_backend import TorchBackend

    class Copy(TorchBackend):
        @cached_property
        def _impls(self):
            return {**TorchBackend._impls.func(self), **overrides}

    return Copy("torch-copy", "cpu", ("float16", "bfloat16", "float32", "float64"))


def _checks(b, op: str, dtype: str, checks=("forward",), n: int = 30) -> list[dict]:
    return [run_target(b, Target(b.name, op, dtype, c), Settings(max_examples=n, seed=1),
                       dict(b.deviations)) for c in checks]


def test_an_ignore_index_bug_in_torch_float16_cross_entropy_fails():
    import torch
    import torch.nn.functional as F

    def ce(logits, targets, ignore_index=-100, label_smoothing=0.0):  # ignored rows count
        t = torch.where(targets == ignore_index, torch.zeros_like(targets), targets)
        return F.cross_entropy(logits, t, label_smoothing=label_smoothing)

    b = _torch_copy({"cross_entropy": ce})
    assert "cross_entropy/forward/float16" in b.deviations
    (r,) = _checks(b, "cross_entropy", "float16", n=60)
    assert r["status"] == "fail", r["message"]


def test_a_clipping_bug_that_scales_gradients_up_in_torch_float16_fails():
    import torch

    from lmspec.backends import torch_training

    def clip(grads, max_norm, norm_type=2.0):
        out, total = torch_training.clip_grad_norm(grads, max_norm, norm_type)
        up = torch.clamp(total.float() / max_norm, min=1.0) if max_norm > 0 else 1.0
        return tuple((g.float() * up * up).to(g.dtype) for g in out), total

    b = _torch_copy({"clip_grad_norm": clip})
    assert "clip_grad_norm" in b.deviations
    (r,) = _checks(b, "clip_grad_norm", "float16", n=60)
    assert r["status"] == "fail", r["message"]


def test_a_residual_bug_on_offset_inputs_in_torch_float32_encoder_backward_fails():
    from lmspec.backends import torch_attention as ta

    def encoder(x, *rest, **kw):  # inside the offset region: the residual counted 1.1 times
        out = ta.transformer_encoder_layer(x, *rest, **kw)
        return out + 0.1 * x if abs(float(x.detach().mean())) >= 50 else out

    b = _torch_copy({"transformer_encoder_layer": encoder})
    dev = b.deviations["transformer_encoder_layer/vjp/float32"]
    assert dev.applies is ta.offset_residual_stream and dev.bound == 8.0
    (r,) = _checks(b, "transformer_encoder_layer", "float32", checks=("vjp",), n=60)
    assert r["status"] == "fail", r["message"]
    assert abs(float(np.mean(r["counterexample"]["input"]["args"][0]["array"]))) >= 50


def test_torch_half_bounds_keep_the_nan_predicates_of_their_ops():
    from lmspec.backends import declared
    from lmspec.backends import torch_attention as ta
    from lmspec.backends import torch_core as tc
    from lmspec.backends import torch_training as tt

    core, attn = tc.DEVIATIONS("cpu"), ta.DEVIATIONS("cpu")
    for key in ("softmax/vjp/float16", "logsumexp/vjp/bfloat16", "log_softmax/vjp/float16"):
        bound, nan = core[key]
        assert bound.bound == key.rsplit("/", 1)[1] and nan.applies is declared.one_element_infinity
    assert [d.bound for d in core["cross_entropy/forward/float16"]] == ["float16", None]
    assert core["cross_entropy/forward/float16"][1].applies is tc.smoothing_overflows
    assert attn["scaled_dot_product_attention/vjp/float16"][1] is attn[
        "scaled_dot_product_attention"]
    assert attn["transformer_encoder_layer/forward/bfloat16"][1] is attn[
        "transformer_encoder_layer/forward"]
    assert tt.DEVIATIONS["kl_divergence/forward/float16"][1] is tt.DEVIATIONS["kl_divergence"]


def test_torch_sdpa_is_called_as_users_call_it_and_its_nan_is_declared():
    torch = pytest.importorskip("torch")
    from lmspec.backends import torch_attention as ta

    q = k = v = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    out = ta.scaled_dot_product_attention(q, k, v, is_causal=True, scale=-0.5)
    assert torch.isnan(out[0, 0, 0]).all()  # torch 2.13's CPU kernel, not corrected
    dev = ta.DEVIATIONS("cpu")["scaled_dot_product_attention"]
    args = (np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)))
    assert dev.applies(args, {"is_causal": True, "scale": -0.5})
    assert not dev.applies(args, {"is_causal": True, "scale": 0.5})
    assert not dev.applies(args, {"is_causal": False, "scale": -0.5})
    assert not dev.applies((*args[:2], np.ones((1, 1, 2, 3))), {"is_causal": True,
                                                                "scale": -0.5})


def test_torch_encoder_fast_path_nan_is_declared_for_the_queries_that_see_no_key():
    torch = pytest.importorskip("torch")
    from lmspec.backends import torch_attention as ta

    dev = ta.DEVIATIONS("cpu")["transformer_encoder_layer/forward"]
    x = np.zeros((2, 3, 4))
    weights = tuple(np.zeros(1) for _ in range(16))
    none_valid = np.array([[False] * 3, [True] * 3])
    assert dev.applies((x, weights, 2, none_valid), {})
    assert not dev.applies((x, weights, 1, none_valid), {})  # odd heads: no fast path
    assert not dev.applies((x, weights, 2, np.ones((2, 3), bool)), {})
    first_masked = np.array([[False, True, True], [True] * 3])
    assert dev.applies((x, weights, 2, first_masked), {"is_causal": True})
    assert not dev.applies((x, weights, 2, first_masked), {"is_causal": False})
    del torch


def _jax_copy(overrides: dict):
    pytest.importorskip("jax")
    from lmspec.backends.jax_backend import JaxBackend

    class Copy(JaxBackend):
        @cached_property
        def _impls(self):
            return {**JaxBackend._impls.func(self), **overrides}

    return Copy("jax-copy", "cpu", ("float16", "bfloat16", "float32", "float64"))


def test_a_layer_norm_scale_bug_in_jax_bfloat16_fails():
    import jax

    def ln(x, gamma, beta, eps=1e-5):  # γ applied with a 10 % error
        return jax.nn.standardize(x, axis=-1, epsilon=eps) * (gamma * 1.1) + beta

    b = _jax_copy({"layer_norm": ln})
    assert "layer_norm/forward" in b.deviations
    (r,) = _checks(b, "layer_norm", "bfloat16", n=30)
    assert r["status"] == "fail", r["message"]


def test_jax_returns_the_mean_of_the_values_for_a_query_that_sees_no_key():
    jax = pytest.importorskip("jax")
    from lmspec.backends import jax_attention as ja

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, n, 4)) for n in (2, 3, 3))
    mask = np.array([[False] * 3, [True] * 3])
    out = np.asarray(ja.scaled_dot_product_attention(q, k, v, mask))
    np.testing.assert_allclose(out[0, 0, 0], v[0, 0].mean(axis=0), rtol=1e-6)
    dev = ja.DEVIATIONS["scaled_dot_product_attention"]
    assert dev.applies((q, k, v, mask), {})
    assert not dev.applies((q, k, v, np.ones((2, 3), bool)), {})
    bound, no_key = ja.DEVIATIONS["scaled_dot_product_attention/*/float64"]
    assert bound.bound == "float32" and no_key is dev  # the no-key predicate beside it


def test_the_example_packages_load(tmp_path):
    root = Path(__file__).parents[1] / "examples" / "torch-kernel"
    sys.path.insert(0, str(root))
    try:
        from lmspec_torch_kernel.plugin import KernelBackend
    finally:
        sys.path.remove(str(root))
    pytest.importorskip("torch")
    for key, dev in KernelBackend("k", "cpu", ("float16",)).deviations.items():
        deviation_descriptor(key, dev)


# -- several deviations under one key -------------------------------------------------------

SEVERAL = '''
import numpy as np
import lmspec

def one_element(args, kwargs):
    return args[0].shape[kwargs.get("axis", -1)] == 1

class B:
    """softmax with a float16 accumulator, and NaN over a one-element axis."""
    name, device, dtypes = "several-deviations", "cpu", ("float16",)
    deviations = {"softmax/forward/float16": (
        lmspec.Deviation("a float16 accumulator", bound="float16"),
        lmspec.Deviation("NaN over a one-element axis", applies=one_element))}

    def softmax(self, x, axis=-1):
        if x.shape[axis] == 1:
            return np.full_like(x, np.nan)
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

@lmspec.hookimpl
def register_backends(register):
    register(B())
'''


def test_a_key_may_hold_several_deviations_and_any_of_them_excuses(tmp_path):
    """Through the backend host: the bound and the predicate each excuse their own
    examples, and the report lists both under the key."""
    (tmp_path / "several_deviations_plugin.py").write_text(SEVERAL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "LMSPEC_PLUGINS": "several_deviations_plugin", "LMSPEC_SANDBOX": "none"}
    out = subprocess.run([sys.executable, "-m", "lmspec", "run", "--backend",
                          "several-deviations", "--op", "softmax", "--check", "forward",
                          "--max-examples", "40", "--report-dir", str(tmp_path / "r")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (path,) = (tmp_path / "r").glob("*.json")
    rep = json.loads(path.read_text())
    (r,) = rep["results"]
    assert r["status"] == "deviation"
    assert [p["bound"] for p in r["deviation"]["parts"]] == ["float16", None]
    (b,) = rep["backends"]
    assert [(d["key"], d["bound"], d["predicate"]) for d in b["deviations"]] == [
        ("softmax/forward/float16", "float16", False), ("softmax/forward/float16", None, True)]


def test_several_deviations_excuse_no_more_than_their_union():
    one = lmspec.Deviation("NaN over one element", applies=lambda a, k: a[0].shape[-1] == 1)
    small = lmspec.Deviation("a little off", bound=3.0)
    b = Softmax(error=lambda x: 1e-3 * np.ones_like(x),
                deviations={"softmax/forward": (one, small)})
    assert _run(b)["status"] == "fail"  # 1e-3 is far beyond 3× the float64 tolerance
