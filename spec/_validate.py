"""Input validation shared by every reference op (CONTRACT §1).

Every message names the op, the argument and what was expected, e.g.
``softmax: argument 'x' must be a float array, got dtype bool``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._precision import DTYPES, fl

Dim = int | None  # None = any size


def fail(op: str, name: str, expected: str, got: object) -> None:
    raise ValueError(f"{op}: argument '{name}' must be {expected}, got {got}")


def _shape_ok(shape: tuple[int, ...], want: Sequence[Dim]) -> bool:
    return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))


def _check_shape(op: str, name: str, a: np.ndarray, shape: Sequence[Dim] | None, ndim: int | None):
    if ndim is not None and a.ndim != ndim:
        fail(op, name, f"a {ndim}-d array", f"shape {a.shape}")
    if shape is not None and not _shape_ok(a.shape, shape):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        fail(op, name, f"shape {want}", f"shape {a.shape}")


def floats(
    op: str, name: str, x: object, *, ndim: int | None = None, shape: Sequence[Dim] | None = None,
    min_ndim: int = 0,
) -> np.ndarray:
    """A float argument, converted to the working dtype; rejects bool/complex/object/str."""
    a = np.asarray(x)
    if a.dtype == np.bool_ or a.dtype.kind not in "fiu" and a.dtype not in DTYPES.values():
        fail(op, name, "a float array", f"dtype {a.dtype}")
    if a.ndim < min_ndim:
        fail(op, name, f"an array with at least {min_ndim} dimension(s)", f"shape {a.shape}")
    _check_shape(op, name, a, shape, ndim)
    return fl(a)


def ints(
    op: str, name: str, x: object, *, ndim: int | None = None, shape: Sequence[Dim] | None = None,
    low: int | None = None, high: int | None = None, allow: Sequence[int] = (),
) -> np.ndarray:
    """An integer array (any integer dtype), as int64, with values in ``[low, high)``
    (``allow`` lists extra accepted values such as ``ignore_index``)."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        fail(op, name, "an integer array", f"dtype {a.dtype}")
    _check_shape(op, name, a, shape, ndim)
    a = a.astype(np.int64)
    bad = np.zeros(a.shape, dtype=bool)
    if low is not None:
        bad |= a < low
    if high is not None:
        bad |= a >= high
    for v in allow:
        bad &= a != v
    if bad.any():
        rng = f"in [{low}, {high})" + (f" or one of {list(allow)}" if allow else "")
        where = np.argwhere(bad)[0].tolist()
        fail(op, name, f"values {rng}", f"{a[bad].ravel()[0]} at index {where}")
    return a


def mask(op: str, name: str, m: object, *, shape: Sequence[Dim] | None = None,
         ndim: int | None = None) -> np.ndarray | None:
    """A boolean mask (``True`` = takes part) or ``None``; any other dtype is an error."""
    if m is None:
        return None
    a = np.asarray(m)
    if a.dtype != np.bool_:
        fail(op, name, "a bool mask", f"dtype {a.dtype}")
    _check_shape(op, name, a, shape, ndim)
    return a


def one_of(op: str, name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        fail(op, name, "one of " + ", ".join(repr(c) for c in choices), repr(value))


def integer(op: str, name: str, value: object, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        fail(op, name, "an int", repr(value))
    if low is not None and value < low:
        fail(op, name, f"an int >= {low}", repr(value))
    return int(value)


def real(op: str, name: str, value: object, *, low: float | None = None, high: float | None = None,
         low_open: bool = False) -> float:
    """A real scalar in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        fail(op, name, "a real number", repr(value))
    v = float(value)
    below = low is not None and (v <= low if low_open else v < low)
    if np.isnan(v) or below or (high is not None and v > high):
        lo = "(" if low_open else "["
        fail(op, name, f"a number in {lo}{low}, {high}]", repr(value))
    return v


def axis(op: str, name: str, value: object, ndim: int) -> int:
    ax = integer(op, name, value)
    if not -ndim <= ax < ndim:
        fail(op, name, f"an axis in [{-ndim}, {ndim})", repr(value))
    return ax % ndim
