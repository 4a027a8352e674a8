"""Hostile plugins for issue 24 ("the judged cannot reach the judge"), one module per
kind of attack: :mod:`hostile.wire` (the reply channel), :mod:`hostile.names` (what a host
says about its backends), :mod:`hostile.escape` (files, processes, signals, ptrace).

Each hostile backend tries its attack from inside ``softmax`` and then answers wrongly
(uniform weights) or raises, so the judge is right only if it never ends with ``pass``
for it, survives, and keeps every other backend's verdict.
"""

from __future__ import annotations

import numpy as np


def uniform(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """A wrong softmax: every check of it fails when it is judged."""
    return np.full_like(x, 1.0 / x.shape[axis]) if x.size else x.copy()


class Base:
    """A backend that implements softmax by calling ``attack``."""

    device, dtypes = "cpu", ("float32", "float64")

    def __init__(self, name: str):
        self.name = name

    def attack(self, x: np.ndarray, axis: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def softmax(self, x, axis=-1):
        return self.attack(x, axis)
