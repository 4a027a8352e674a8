"""Independent correct implementations raise no alarm.

``NumpyLiteral`` evaluates each op's *literal* textbook formula with NumPy
(``np.linalg.norm`` for the p-norm, ``exp(x − max)/Σ`` for softmax, the two-pass mean and
variance for layer norm, hyperparameters held in float32): not the reference's
algorithms, and not torch's. It computes float32 and float64 in themselves and the half
dtypes as CONTRACT §6 says production kernels do: inputs widened to float32, every
intermediate in float32, the outputs rounded to the half dtype. Every check it can run on
the default profile must pass in every dtype it declares; a false alarm here is a hole
in the tolerance model (conformance.tolerance, conformance.conditioning), not a backend
bug.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from lmspec._precision import dtype_name
from lmspec.conformance.harness import Settings, Target, checks_of, run_target


def _axis_max(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return np.where(np.isfinite(m), m, np.zeros_like(m))


def _c(x: np.ndarray, value: float) -> np.generic:
    """A constant in ``x``'s dtype (NumPy would widen bfloat16 next to a Python float)."""
    return x.dtype.type(value)


def _attr(x: np.ndarray, value: float) -> np.generic:
    """A hyperparameter held as a float32 attribute, then used in ``x``'s dtype (as an
    engine whose attributes are float32 does, also when it computes in float64)."""
    return x.dtype.type(np.float32(value))


HALF = ("float16", "bfloat16")


def _mixed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Half-precision inputs widened to float32, the formula run in float32, the float
    outputs rounded back to the input's half dtype (CONTRACT §6); other dtypes as given."""

    def widen(a: Any) -> Any:
        if isinstance(a, (tuple, list)):
            return tuple(widen(b) for b in a)
        return a.astype(np.float32) if isinstance(a, np.ndarray) and _is_half(a) else a

    def narrow(a: Any, dt: np.dtype) -> Any:
        if isinstance(a, (tuple, list)):
            return tuple(narrow(b, dt) for b in a)
        return np.asarray(a).astype(dt) if np.asarray(a).dtype.kind == "f" else a

    @functools.wraps(fn)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        half = next((a.dtype for a in _arrays(args) if _is_half(a)), None)
        if half is None:
            return fn(self, *args, **kwargs)
        return narrow(fn(self, *widen(args), **kwargs), half)

    return run


def _is_half(a: np.ndarray) -> bool:
    return a.dtype.kind in "fV" and a.dtype.itemsize == 2


def _arrays(x: Any) -> list[np.ndarray]:
    if isinstance(x, (tuple, list)):
        return [a for b in x for a in _arrays(b)]
    return [x] if isinstance(x, np.ndarray) else []


class NumpyLiteral:
    """The contract's formulas, literally, in NumPy, in the dtype of the inputs (float32
    for the half dtypes, see :func:`_mixed`); the hyperparameters ``eps``, ``scale`` (also
    the default ``1/√E``) and ``base`` held in float32."""

    name, device = "numpy-literal", "cpu"
    dtypes = ("float16", "bfloat16", "float32", "float64")

    @_mixed
    def softmax(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        if x.shape[axis] == 1:  # exactly 1 whatever the value, -inf included (§6)
            return np.ones_like(x)
        e = np.exp(x - _axis_max(x, axis))
        return e / e.sum(axis=axis, keepdims=True)

    @_mixed
    def log_softmax(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        if x.shape[axis] == 1:  # exactly 0 whatever the value, -inf included (§6)
            return np.zeros_like(x)
        z = x - _axis_max(x, axis)
        return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))

    @_mixed
    def logsumexp(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        m = _axis_max(x, axis)
        return np.squeeze(m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True)), axis=axis)

    @_mixed
    def layer_norm(self, x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                   eps: float = 1e-5) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return ((x - mean) / np.sqrt(var + _attr(x, eps)) * gamma + beta).astype(x.dtype)

    @_mixed
    def scaled_dot_product_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                                     mask: np.ndarray | None = None, is_causal: bool = False,
                                     scale: float | None = None) -> np.ndarray:
        n_q, n_k = q.shape[-2], k.shape[-2]
        allow = np.ones((n_q, n_k), bool) if mask is None else mask
        if is_causal:
            allow = allow & np.tri(n_q, n_k, dtype=bool)
        allow = np.broadcast_to(allow, (*q.shape[:-1], n_k))
        s = (q @ np.swapaxes(k, -1, -2)) * _attr(q, 1 / math.sqrt(q.shape[-1])
                                                 if scale is None else scale)
        s = np.where(allow, s, _c(q, -np.inf))
        none = ~allow.any(axis=-1, keepdims=True)
        p = self.softmax(np.where(none, _c(q, 0), s), axis=-1)
        return (np.where(none, _c(q, 0), p) @ v).astype(q.dtype)

    def sinusoidal_positional_encoding(self, length: int, d_model: int, base: float = 1e4,
                                       dtype: str = "float64") -> np.ndarray:
        out = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(_bf16())
        dt = np.dtype(np.float32) if dtype in HALF else out  # angles in float32 (§6)
        exponent = -np.arange(0, d_model, 2).astype(dt) / dt.type(d_model)
        inv_freq = dt.type(np.float32(base)) ** exponent
        angle = np.arange(length).astype(dt)[:, None] * inv_freq
        pe = np.empty((length, d_model), dtype=dt)
        pe[:, 0::2], pe[:, 1::2] = np.sin(angle), np.cos(angle)
        return pe.astype(out)

    @_mixed
    def clip_grad_norm(self, grads: tuple[np.ndarray, ...], max_norm: float,
                       norm_type: float = 2.0) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        dt = grads[0].dtype
        flat = np.concatenate([g.ravel() for g in grads])
        if dtype_name(dt) == "bfloat16":  # np.linalg.norm widens bfloat16 to float64
            p = dt.type(norm_type)
            total = (np.abs(flat).max(initial=dt.type(0)) if math.isinf(norm_type) else
                     np.sum(np.abs(flat) ** p) ** (dt.type(1) / p))
        else:
            total = np.linalg.norm(flat, ord=norm_type)
        total = np.asarray(total).astype(dt)
        if np.any(flat) and np.all(np.isfinite(flat)) and not 0 < total < np.inf:
            raise NotImplementedError("|g|^p over- or underflows in the literal formula")
        coef = np.minimum(_c(total, 1), _c(total, max_norm) / total) if total else _c(total, 1)
        return tuple((g * coef).astype(dt) for g in grads), total


def _bf16() -> Any:
    import ml_dtypes

    return ml_dtypes.bfloat16


OPS = ("softmax", "log_softmax", "logsumexp", "layer_norm", "clip_grad_norm",
       "sinusoidal_positional_encoding", "scaled_dot_product_attention")


@pytest.mark.parametrize("dtype", NumpyLiteral.dtypes)
@pytest.mark.parametrize("op", OPS)
def test_literal_numpy_raises_no_alarm(op: str, dtype: str):
    backend = NumpyLiteral()
    config = Settings(profile="default")
    bad = []
    for check in checks_of(op):
        if check == "vjp":
            continue
        r = run_target(backend, Target(backend.name, op, dtype, check), config, {})
        if r["status"] != "pass":
            bad.append(f"{check}: {r['status']}: {r['message']}")
    assert not bad, "\n".join(bad)


def test_the_p3_norm_literal_formula_is_34u_off_and_conforms():
    """``np.linalg.norm([1e30], 3)`` is ``(1e90)^fl(1/3)``: 34 u below 1e30."""
    total = NumpyLiteral().clip_grad_norm((np.array([1e30]),), 0.5, 3.0)[1]
    assert abs(float(total) - 1e30) / 1e30 / 2.0**-53 == pytest.approx(34.2, abs=0.1)
