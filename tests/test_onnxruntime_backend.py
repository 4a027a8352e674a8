"""The onnxruntime-cpu backend: lazy import, dtype refusals, gate re-packing, and a few ops
through the real harness."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import lmspec
from lmspec.conformance.harness import Settings, Target, checks_of, run_target


def test_plugin_import_loads_no_engine():
    code = ("import sys, lmspec.backends.builtin, lmspec.backends.onnxruntime_backend; "
            "print(any(m in sys.modules for m in ('onnxruntime', 'onnx', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_cuda_backend_is_unavailable_without_its_provider():
    from lmspec.backends.onnxruntime_backend import OrtBackend

    ok, why = OrtBackend("onnxruntime-cuda", "cuda:0", ("float32",),
                         provider="CUDAExecutionProvider").available()
    if not ok:
        assert "CUDAExecutionProvider" in why or "not installed" in why


ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def backend():
    from lmspec.backends.onnxruntime_backend import OrtBackend

    return OrtBackend("onnxruntime-cpu", "cpu", ("float16", "bfloat16", "float32", "float64"))


def test_available_and_info(backend):
    assert backend.available() == (True, "")
    info = backend.info()
    assert info["onnxruntime"] == ort.__version__
    assert info["provider"] == "CPUExecutionProvider"
    assert "softmax" in info["notes"]


def test_no_vjp(backend):
    assert not hasattr(backend, "vjp")


def test_float16_softmax_is_refused_not_widened(backend):
    """ONNX Runtime has no float16 Softmax kernel on the CPU and would run the op's
    function body in float32 between inserted Casts: that is unsupported."""
    with pytest.raises(NotImplementedError, match="float16"):
        backend.softmax(np.zeros((2, 3), np.float16))


def test_lstm_double_is_unsupported(backend):
    x = np.zeros((1, 2, 3))
    h = np.zeros((1, 1, 2))
    w = (np.zeros((8, 3)), np.zeros((8, 2)), np.zeros(8), np.zeros(8))
    with pytest.raises(NotImplementedError, match="does not support double"):
        backend.lstm(x, h, h, w)


@pytest.mark.parametrize("op, kwargs", [
    ("lstm", {"num_layers": 2, "bidirectional": True}),
    ("gru", {"num_layers": 1, "bidirectional": True, "linear_before_reset": False}),
    ("gru", {"num_layers": 2, "bidirectional": False, "linear_before_reset": True}),
    ("rnn", {"num_layers": 2, "bidirectional": True, "nonlinearity": "relu"}),
])
def test_recurrent_gate_order_matches_reference(backend, op, kwargs):
    rng = np.random.default_rng(0)
    B, T, I, H = 2, 3, 4, 5
    L, D = kwargs["num_layers"], 2 if kwargs["bidirectional"] else 1
    G = {"rnn": 1, "lstm": 4, "gru": 3}[op]
    weights = []
    for layer in range(L):
        for _ in range(D):
            inp = I if layer == 0 else D * H
            weights += [rng.standard_normal((G * H, inp)), rng.standard_normal((G * H, H)),
                        rng.standard_normal(G * H), rng.standard_normal(G * H)]
    f32 = [w.astype(np.float32) for w in weights]
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    states = [rng.standard_normal((L * D, B, H)).astype(np.float32)
              for _ in range(2 if op == "lstm" else 1)]
    got = getattr(backend, op)(x, *states, tuple(f32), **kwargs)
    want = getattr(lmspec, op)(x.astype(np.float64), *(s.astype(np.float64) for s in states),
                               tuple(w.astype(np.float64) for w in f32), **kwargs)
    # a wiring check (a wrong gate order is off by O(1)); conformance is the harness's
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_logsumexp_deviation_is_narrow(backend):
    dev = backend.deviations["logsumexp/forward/float64"]
    assert dev.applies((np.array([[-np.inf, -718.0]]),), {"axis": 1})
    assert not dev.applies((np.array([[-1.0, -718.0]]),), {"axis": 1})
    # the measured engine behaviour behind it
    got = backend.logsumexp(np.array([[-np.inf, -745.0]]))
    assert abs(got[0] - -745.0) > 0.5


@pytest.mark.parametrize("op, dtype", [
    ("softmax", "float32"), ("cross_entropy", "float64"), ("lstm_cell", "float32"),
    ("layer_norm", "float32"), ("scaled_dot_product_attention", "float16"),
    ("rms_norm", "float32"), ("grouped_query_attention", "float32"),
    ("logsumexp", "float64"),
])
def test_conformance_through_the_harness(backend, op, dtype):
    config = Settings(max_examples=10)
    results = [run_target(backend, Target(backend.name, op, dtype, c), config,
                          dict(backend.deviations)) for c in checks_of(op)]
    status = {r["check"]: r["status"] for r in results}
    assert status.pop("vjp", "unsupported") == "unsupported"
    assert set(status.values()) <= {"pass", "deviation"}, results


def test_unsupported_dtype_through_the_harness(backend):
    r = run_target(backend, Target(backend.name, "log_softmax", "bfloat16", "forward"),
                   Settings(max_examples=5), {})
    assert r["status"] == "unsupported"
    assert "bfloat16" in r["message"] or "no kernel" in r["message"]
