"""The building blocks the families share: masked softmax and its pullback, attention
over scores, the linear map, the causal mask, the activations and the logistic sigmoid.

Each ``*_fwd``-style block returns ``(output, pullback)``: the pullback is the
hand-derived vector-Jacobian product of the block, closed over its intermediates
(:mod:`lmspec.attention` explains the convention). Families import these by their
public names; nothing here is a catalogue op.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._precision import activation

Pullback = Callable[..., Any]

def masked_softmax(e: np.ndarray, allow: np.ndarray | None,
                    overwrite: bool = False) -> np.ndarray:
    """``p_j = allow_j · exp(e_j − m) / Σ_k allow_k · exp(e_k − m)`` over the last axis.

    ``m`` is the maximum over the *allowed* scores only (so extreme masked-out scores
    cannot underflow the allowed ones; ``m = 0`` when it is not finite). A row with nothing
    allowed gives ``p = 0``. Masked scores become ``−∞`` before the maximum, so their
    ``exp(−∞ − m)`` is exactly 0. Evaluated in place in one buffer (``e`` itself when
    ``overwrite``): maximum, subtract, exponentiate, sum, divide.
    """
    z = e if allow is None else np.where(allow, e, -np.inf)
    m = np.max(z, axis=-1, keepdims=True)
    m[~np.isfinite(m)] = 0
    z = np.subtract(z, m, out=z if overwrite or allow is not None else None)
    np.exp(z, out=z)
    total = np.sum(z, axis=-1, keepdims=True)
    total[~(total > 0)] = 1
    z /= total
    return z


def softmax_pullback(p: np.ndarray, dp: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """``∂L/∂e = p ⊙ (∂L/∂p − Σ_j p_j ∂L/∂p_j)``; zero where ``p`` is (masked keys, and
    rows with nothing allowed, whose weights are the constant 0). In place in ``dp`` when
    ``overwrite``."""
    rowsum = np.sum(dp * p, axis=-1, keepdims=True)
    d = np.subtract(dp, rowsum, out=dp if overwrite else None)
    d *= p
    return d


def attend(e: np.ndarray, allow: np.ndarray | None, values: np.ndarray,
                overwrite: bool = False):
    """``p = masked_softmax(e)``, ``out = p @ values`` for scores ``e[..., L, S]`` and
    ``values[..., S, Ev]`` (``e`` may be overwritten when ``overwrite``). Pullback:
    ``(∂out, ∂p) -> (∂e, ∂values)``."""
    p = masked_softmax(e, allow, overwrite)
    out = p @ values

    def back(d_out, d_p=None):
        dp = d_out @ np.swapaxes(values, -1, -2)
        if d_p is not None:
            dp += d_p
        return softmax_pullback(p, dp, overwrite=True), np.swapaxes(p, -1, -2) @ d_out

    return (out, p), back


def linear(x: np.ndarray, W: np.ndarray, b: np.ndarray | None):
    """``y = x Wᵀ + b``. Pullback: ``∂y -> (∂x = ∂y W, ∂W = Σ ∂yᵀ x, ∂b = Σ ∂y)``. Leading
    axes are flattened, so that each product is one GEMM."""
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1])
    y = (x2 @ W.T).reshape(*x.shape[:-1], W.shape[0])
    if b is not None:
        y += b

    def back(dy):
        dy2 = dy.reshape(rows, dy.shape[-1])
        return (dy2 @ W).reshape(x.shape), dy2.T @ x2, np.sum(dy2, axis=0)

    return y, back


def causal(n_q: int, n_k: int) -> np.ndarray:
    """Top-left causal mask ``[L, S]``: query ``i`` sees keys ``j ≤ i``."""
    return np.tril(np.ones((n_q, n_k), dtype=bool))


def erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype)


def activation_forward(x: np.ndarray, kind: str):
    """``relu(x) = max(x, 0)`` or the exact GELU ``x Φ(x)``, ``Φ(x) = (1 + erf(x/√2))/2``
    (Hendrycks & Gimpel 2016). Pullback: ``∂x = ∂y · [x > 0]`` or
    ``∂y · (Φ(x) + x φ(x))``, ``φ(x) = exp(−x²/2)/√(2π)``."""
    if kind == "relu":
        return np.maximum(x, 0), lambda dy: dy * (x > 0)
    cdf = (1 + erf(x / math.sqrt(2))) / 2
    pdf = np.exp(-(x * x) / 2) / math.sqrt(2 * math.pi)
    return x * cdf, lambda dy: dy * (cdf + x * pdf)


def sigmoid(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``σ(a) = 1 / (1 + e^{−a})``, as ``1 / (1 + e^{−|a|})`` for ``a ≥ 0`` and
    ``e^{−|a|} / (1 + e^{−|a|})`` for ``a < 0``: one exponential that cannot overflow,
    full relative accuracy in both tails, NaN kept. ``out`` may be ``a`` itself."""
    e = np.abs(a)
    np.negative(e, out=e)
    np.exp(e, out=e)
    num = np.greater_equal(a, 0, out=np.empty_like(e), casting="unsafe")
    np.maximum(e, num, out=num)  # 1 where a ≥ 0, e^{−|a|} (NaN for NaN) elsewhere
    den = np.add(e, 1, out=out)
    return activation(np.divide(num, den, out=den))
