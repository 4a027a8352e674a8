"""The same backend with two one-line bugs a kernel author could make."""

import numpy as np

import lmspec
from lmspec_outsider import NumpyCore


class BuggyCore(NumpyCore):
    name = "outsider-buggy"

    def softmax(self, x, axis=-1):
        e = np.exp(x)  # bug: no max subtraction
        return e / e.sum(axis=axis, keepdims=True)

    def cross_entropy(self, logits, targets, ignore_index=-100, label_smoothing=0.0):
        lp = self.log_softmax(logits)
        keep = targets != ignore_index
        nll = -lp[np.arange(len(targets)), np.where(keep, targets, 0)]
        row = (1 - label_smoothing) * nll - label_smoothing * lp.mean(axis=1)
        return np.where(keep, row, 0).sum() / len(targets)  # bug: averages over ignored rows


@lmspec.hookimpl
def register_backends(register):
    register(BuggyCore())
