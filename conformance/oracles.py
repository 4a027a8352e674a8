"""Independent oracles for checking a vjp: float64 central differences.

``finite_difference_vjp(op, args, kwargs, cotangent)`` returns the same form as
``lmspec.vjp`` (and a backend's ``vjp``): one entry per positional argument, an array
for a differentiable array, a tuple for a tuple argument, ``None`` otherwise. The
project's tests check every hand-derived reference vjp against it; a plugin author
can check a backend's own gradients the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import lmspec


def _dot(cot: Any, out: Any) -> float:
    """``⟨cot, out⟩`` summed over every array of (possibly tuple) outputs."""
    if isinstance(out, tuple):
        return sum(_dot(c, o) for c, o in zip(cot, out, strict=True))
    return float(np.sum(np.asarray(cot, dtype=np.float64) * np.asarray(out, dtype=np.float64)))


def _with(args: Sequence[Any], i: int, j: int | None, value: np.ndarray) -> tuple[Any, ...]:
    """``args`` with argument ``i`` (member ``j`` of a tuple argument) replaced."""
    new = value if j is None else (*args[i][:j], value, *args[i][j + 1:])
    return (*args[:i], new, *args[i + 1:])


def finite_difference_vjp(op: str, args: Sequence[Any], kwargs: Mapping[str, Any] | None,
                          cotangent: Any, h: float = 1e-6) -> tuple[Any, ...]:
    """``⟨cotangent, ∂op/∂args[i]⟩`` by central differences ``(f(x+h) − f(x−h)) / 2h`` of
    the float64 reference, one element at a time (truncation error O(h²))."""
    d = lmspec.OPS[op]
    kw = dict(kwargs or {})
    args = tuple(tuple(np.asarray(m, dtype=np.float64) for m in a) if isinstance(a, tuple)
                 else a for a in args)

    def grad(i: int, j: int | None) -> np.ndarray:
        x = np.asarray(args[i] if j is None else args[i][j], dtype=np.float64)
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            vals = []
            for step in (h, -h):
                xs = x.copy()
                xs[idx] += step
                vals.append(_dot(cotangent, d.reference(*_with(args, i, j, xs), **kw)))
            g[idx] = (vals[0] - vals[1]) / (2 * h)
        return g

    out: list[Any] = []
    for i, (name, a) in enumerate(zip(d.params, args)):
        if name not in d.diff or a is None:
            out.append(None)
        elif isinstance(a, tuple):
            out.append(tuple(grad(i, j) for j in range(len(a))))
        else:
            out.append(grad(i, None))
    return tuple(out)
