"""The jax-cpu backend: lazy import, jax.vjp gradients, and a few ops through the harness."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import lmspec
from lmspec.backends.jax_backend import JaxBackend
from lmspec.conformance.harness import Settings, Target, run_target

pytest.importorskip("jax")


@pytest.fixture(scope="module")
def backend() -> JaxBackend:
    return JaxBackend("jax-cpu", "cpu", ("float16", "bfloat16", "float32", "float64"))


def test_importing_the_plugin_imports_no_jax():
    code = ("import sys, lmspec.backends.builtin, lmspec.backends.jax_backend as j; "
            "j.JaxBackend('jax-cpu', 'cpu', ('float32',)).available(); "
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_jax_cuda_reports_why_it_is_unavailable():
    ok, why = JaxBackend("jax-cuda", "cuda:0", ("float32",)).available()
    assert (ok and why == "") or (not ok and why)


def test_info_names_versions_and_x64(backend):
    info = backend.info()
    assert info["jax"] and info["jaxlib"] and info["jax_enable_x64"] is True
    assert "layer_norm" in info["notes"]


def test_forward_returns_numpy_in_the_dtype_under_test(backend):
    x = np.array([[1.0, 2.0, 3.0]], dtype=np.float16)
    y = backend.softmax(x, axis=-1)
    assert isinstance(y, np.ndarray) and y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), lmspec.softmax(x.astype(np.float64)),
                               atol=1e-3)


def test_vjp_matches_the_reference_gradient(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3))
    W_ih, W_hh = rng.standard_normal((16, 3)), rng.standard_normal((16, 4))
    b_ih, b_hh = rng.standard_normal(16), rng.standard_normal(16)
    h, c = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    args = (x, h, c, W_ih, W_hh, b_ih, b_hh)
    cot = (rng.standard_normal((2, 4)), rng.standard_normal((2, 4)))
    got = backend.vjp("lstm_cell", args, {}, cot)
    want = lmspec.vjp("lstm_cell", args, {}, cot)
    assert len(got) == len(args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_vjp_gives_none_for_arguments_that_are_not_differentiable(backend):
    logits = np.array([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]])
    grads = backend.vjp("cross_entropy", (logits, np.array([2, 0])), {}, np.float64(1.0))
    assert grads[1] is None
    np.testing.assert_allclose(
        grads[0], lmspec.vjp("cross_entropy", (logits, np.array([2, 0])), {}, 1.0)[0],
        atol=1e-15)


def test_a_family_without_a_jax_module_is_unsupported(backend):
    assert not hasattr(backend, "ngram_log_prob")
    r = run_target(backend, Target("jax-cpu", "ngram_log_prob", "float64", "forward"),
                   Settings(max_examples=2), {})
    assert r["status"] == "unsupported"


@pytest.mark.parametrize(("op", "dtype", "check"), [
    ("log_softmax", "float32", "forward"),
    ("cross_entropy", "float64", "vjp"),
    ("gru_cell", "bfloat16", "forward"),
    ("multi_head_attention", "float32", "causal_ignores_future_keys"),
])
def test_ops_conform_through_the_harness(backend, op, dtype, check):
    r = run_target(backend, Target("jax-cpu", op, dtype, check), Settings(max_examples=5),
                   dict(backend.deviations))
    assert r["status"] == "pass", r["message"]


def test_executables_are_dropped_before_the_process_runs_out_of_mappings(monkeypatch):
    """XLA maps every loaded executable's code separately; at vm.max_map_count LLVM fails
    and XLA segfaults. The backend drops its executables when the process holds more than
    a third of the limit (looked at every ``_MAPS_CHECK_EVERY`` calls), and not before."""
    from lmspec.backends import jax_backend as jb

    here = jb._map_counts()  # this process, on Linux: (mappings, limit)
    assert here is None or 0 < here[0] < here[1]
    counts = [(100, 65530)]
    monkeypatch.setattr(jb, "_map_counts", lambda: counts[0])
    b = JaxBackend("jax-cpu", "cpu", ("float32",))
    drops = []
    drop = b._drop_executables
    monkeypatch.setattr(b, "_drop_executables", lambda: (drops.append(1), drop()))
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    for _ in range(jb._MAPS_CHECK_EVERY):
        b.softmax(x)
    assert not drops  # well below the limit: kept
    counts[0] = (30000, 65530)
    for _ in range(2 * jb._MAPS_CHECK_EVERY):
        b.softmax(x)
    assert len(drops) == 2
    np.testing.assert_allclose(b.softmax(x), lmspec.softmax(x), rtol=1e-6)
