"""An lmspec backend in pure NumPy for the core ops, with hand-written gradients.

Each method has the catalogue's signature (``lmspec ops``); arrays arrive in the dtype
under test (float32 or float64 here) and the results stay in it. ``vjp`` follows the
backend convention: ``vjp(op, args, kwargs, cotangent)`` with ``args`` the positional
arrays as the op received them, ``kwargs`` its options and ``cotangent`` shaped like the
output (a 0-d array for the scalar loss); it returns one entry per positional argument,
``None`` for a non-differentiable one (``targets``).
"""

from __future__ import annotations

import numpy as np

import lmspec

__version__ = "0.1.0"


def _max(x: np.ndarray, axis: int) -> np.ndarray:
    """The row maximum, 0 where it is not finite (so all −inf rows give −inf, not NaN)."""
    m = np.max(x, axis=axis, keepdims=True)
    return np.where(np.isfinite(m), m, 0).astype(x.dtype)


class NumpyBackend:
    """softmax, log_softmax, logsumexp and cross_entropy in NumPy."""

    device = "cpu"
    dtypes = ("float32", "float64")

    def __init__(self, name: str = "numpy-example"):
        self.name = name

    def info(self) -> dict:
        return {"numpy": np.__version__, "package": f"lmspec-example-numpy {__version__}"}

    # p_i = exp(x_i − m) / Σ_j exp(x_j − m), m = max_j x_j (the shift cancels exactly)
    # (over a one-element axis p = 1 whatever x is, −inf included: CONTRACT §6)
    def softmax(self, x, axis=-1):
        if x.shape[axis] == 1:
            return np.ones_like(x)
        e = np.exp(x - _max(x, axis))
        return e / e.sum(axis=axis, keepdims=True)

    # log p_i = x_i − m − log Σ_j exp(x_j − m)
    def log_softmax(self, x, axis=-1):
        if x.shape[axis] == 1:  # log 1 = 0 whatever x is (CONTRACT §6)
            return np.zeros_like(x)
        z = x - _max(x, axis)
        return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))

    # LSE(x) = m + log Σ_j exp(x_j − m)
    def logsumexp(self, x, axis=-1):
        m = _max(x, axis)
        return np.squeeze(m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True)), axis)

    # CE = Σ_{kept rows} [(1−ε)(−log p[y]) − ε·mean_c log p[c]] / #kept
    def cross_entropy(self, logits, targets, ignore_index=-100, label_smoothing=0.0):
        lp = self.log_softmax(logits, axis=-1)
        keep = targets != ignore_index
        nll = -lp[np.arange(len(targets)), np.where(keep, targets, 0)]
        row = (1 - label_smoothing) * nll - label_smoothing * lp.mean(axis=1)
        return np.asarray(np.where(keep, row, 0).sum() / keep.sum(), dtype=logits.dtype)

    def vjp(self, op, args, kwargs, cotangent):
        """The gradient of ``op`` pulled back from ``cotangent``, one entry per argument."""
        g = np.asarray(cotangent)
        if op == "softmax":  # ∂ = p ⊙ (g − Σ g ⊙ p)
            (x,), axis = args, kwargs.get("axis", -1)
            p = self.softmax(x, axis)
            return (p * (g - (g * p).sum(axis=axis, keepdims=True)),)
        if op == "log_softmax":  # ∂ = g − p · Σ g
            (x,), axis = args, kwargs.get("axis", -1)
            return (g - self.softmax(x, axis) * g.sum(axis=axis, keepdims=True),)
        if op == "logsumexp":  # ∂ = g · softmax(x)
            (x,), axis = args, kwargs.get("axis", -1)
            return (np.expand_dims(g, axis) * self.softmax(x, axis),)
        if op == "cross_entropy":  # ∂logits = g · (p − (1−ε)·onehot(y) − ε/C) / #kept
            logits, targets = args
            eps = kwargs.get("label_smoothing", 0.0)
            keep = targets != kwargs.get("ignore_index", -100)
            d = self.softmax(logits, -1) - eps / logits.shape[1]
            rows = np.arange(len(targets))[keep]
            d[rows, targets[keep]] -= 1 - eps
            d = np.where(keep[:, None], d, 0) / max(int(keep.sum()), 1)  # no kept row: 0
            return ((g * d).astype(logits.dtype), None)
        raise NotImplementedError(f"no vjp for {op}")


class BuggyNumpyBackend(NumpyBackend):
    """The same backend with a one-line bug a kernel author could make."""

    def softmax(self, x, axis=-1):
        e = np.exp(x)  # bug: no max subtraction, exp overflows for x ≳ 88.7 in float32
        return e / e.sum(axis=axis, keepdims=True)


@lmspec.hookimpl
def register_backends(register):
    register(NumpyBackend("numpy-example"))
    register(BuggyNumpyBackend("numpy-example-buggy"))
