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
