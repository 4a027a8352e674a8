"""Working precision of the reference.

The reference computes in float64. The conformance harness also evaluates the very
same formulas in the dtype under test (the "baseline" of the tolerance policy,
conformance.tolerance), so every reference function converts its float inputs
with :func:`fl`, which honours :func:`computing_in`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}
"""The float dtypes of the contract (§1), by name."""

UNIT_ROUNDOFF: dict[str, float] = {
    "tf32": 2.0**-11,  # not a storage dtype: float32 products with 10-bit mantissas (CUDA)
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
    "float32": 2.0**-24,
    "float64": 2.0**-53,
}

_WORKING: ContextVar[np.dtype] = ContextVar("lmspec_working_dtype", default=DTYPES["float64"])


def working_dtype() -> np.dtype:
    """The dtype the reference currently computes in (float64 unless overridden)."""
    return _WORKING.get()


@contextmanager
def computing_in(dtype: str | np.dtype) -> Iterator[None]:
    """Evaluate the reference formulas in ``dtype`` instead of float64 (baseline runs)."""
    dt = DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)
    token = _WORKING.set(dt)
    try:
        yield
    finally:
        _WORKING.reset(token)


def fl(x: object) -> np.ndarray:
    """``x`` as an array of the working dtype."""
    return np.asarray(x, dtype=_WORKING.get())


def dtype_name(dt: object) -> str:
    """The contract's name of a float dtype (``ValueError`` if it is not one)."""
    d = np.dtype(dt)
    for name, known in DTYPES.items():
        if d == known:
            return name
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {d}")


@dataclass
class _Rounding:
    rel: float
    hits: int = 0


_ROUNDING: ContextVar[_Rounding | None] = ContextVar("lmspec_activation_rounding",
                                                     default=None)


@contextmanager
def rounding_activations(rel: float) -> Iterator[_Rounding]:
    """Within this block every output of a saturating activation (``tanh``, ``σ``) that a
    reference formula passes through :func:`activation` is multiplied by ``1 + rel``; the
    yielded record counts the arrays moved. The conformance harness measures with it how
    far one rounding of a ``tanh`` or ``σ`` output may move a result: near saturation
    ``1 − tanh²`` and ``σ(1 − σ)`` are computed from the activation's output, so a
    correctly rounded ``tanh(−19.4) = −1`` gives a derivative of exactly 0 where
    ``−1 + 2⁻⁵³`` gives ``2⁻⁵²``, a difference no perturbation of the inputs shows (see
    conformance.conditioning)."""
    record = _Rounding(float(rel))
    token = _ROUNDING.set(record)
    try:
        yield record
    finally:
        _ROUNDING.reset(token)


def activation(h: np.ndarray) -> np.ndarray:
    """``h``, the output of ``tanh`` or ``σ`` just computed, as the formulas use it (and
    its pullback reads it); moved in place inside :func:`rounding_activations`."""
    r = _ROUNDING.get()
    if r is not None and r.rel:
        h *= 1 + r.rel
        r.hits += 1
    return h
