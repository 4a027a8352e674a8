"""A plain NumPy backend for the core ops, written against lmspec's CONTRACT.md only."""

import numpy as np

import lmspec

__version__ = "0.0.1"


class NumpyCore:
    name = "outsider-numpy"
    device = "cpu"
    dtypes = ("float32", "float64")

    def softmax(self, x, axis=-1):
        if x.shape[axis] == 1:  # one element: 1, -inf included (CONTRACT §6, 2026-12-06)
            return np.ones_like(x)
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    def log_softmax(self, x, axis=-1):
        if x.shape[axis] == 1:  # one element: 0 (CONTRACT §6, 2026-12-06)
            return np.zeros_like(x)
        m = np.max(x, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))

    def logsumexp(self, x, axis=-1):
        m = np.max(x, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        return np.squeeze(m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True)), axis)

    def cross_entropy(self, logits, targets, ignore_index=-100, label_smoothing=0.0):
        lp = self.log_softmax(logits)
        keep = targets != ignore_index
        nll = -lp[np.arange(len(targets)), np.where(keep, targets, 0)]
        row = (1 - label_smoothing) * nll - label_smoothing * lp.mean(axis=1)
        return np.where(keep, row, 0).sum() / keep.sum()

    def vjp(self, op, args, kwargs, cotangent):
        if op == "softmax":
            (x,) = args
            axis = kwargs.get("axis", -1)
            p = self.softmax(x, axis)
            return (p * (cotangent - (cotangent * p).sum(axis=axis, keepdims=True)),)
        if op == "cross_entropy":
            logits, targets = args
            eps = kwargs.get("label_smoothing", 0.0)
            keep = targets != kwargs.get("ignore_index", -100)
            g = self.softmax(logits) - eps / logits.shape[1]
            g[np.arange(len(targets))[keep], targets[keep]] -= 1 - eps
            return (cotangent * np.where(keep[:, None], g, 0) / max(keep.sum(), 1), None)
        raise NotImplementedError(op)


@lmspec.hookimpl
def register_backends(register):
    register(NumpyCore())
