"""Input validation shared by every reference op (CONTRACT §1).

Every message names the op, the argument and what was expected, e.g.
``softmax: argument 'x' must be a float array, got dtype bool``. The helpers refuse
everything NumPy would otherwise trip over later with an anonymous error: ragged nested
lists, non-numeric dtypes, integers outside int64, arrays where a scalar option belongs.

Sizes: an op refuses, up front, work on more than :data:`MAX_ELEMENTS` elements that it
would allocate itself (outputs or intermediates sized by integer arguments, or by products
of input sizes such as an attention score matrix), see :func:`budget`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import numpy as np

from ._precision import DTYPES, fl

Dim = int | None  # None = any size

MAX_ELEMENTS = 2**28
"""Largest number of elements an op allocates for one output or intermediate from its
integer arguments or from a product of input sizes (2**28 float64 = 2 GiB); above it the op
raises ``ValueError`` instead of trying (see :func:`budget`)."""

INT64_MAX = 2**63 - 1


def fail(op: str, name: str, expected: str, got: object) -> NoReturn:
    raise ValueError(f"{op}: argument '{name}' must be {expected}, got {got}")


def _shape_ok(shape: tuple[int, ...], want: Sequence[Dim]) -> bool:
    return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))


def _asarray(op: str, name: str, x: object) -> np.ndarray:
    """``np.asarray(x)``, with a ragged nested sequence (or anything else NumPy cannot turn
    into an array) reported by name."""
    if isinstance(x, (str, bytes, dict, set)) or x is None:
        fail(op, name, "an array", f"{type(x).__name__} {_short(x)}")
    try:
        return np.asarray(x)
    except (ValueError, TypeError, OverflowError) as e:
        fail(op, name, "a rectangular array (not a ragged nested sequence)",
             f"{type(x).__name__} ({e})")


def _short(x: object) -> str:
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


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
    """A float argument, converted to the working dtype; rejects bool/complex/object/str
    (integer arrays are accepted and converted)."""
    a = _asarray(op, name, x)
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
    a = _asarray(op, name, x)
    if a.dtype.kind not in "iu":
        fail(op, name, "an integer array", f"dtype {a.dtype}")
    _check_shape(op, name, a, shape, ndim)
    if a.dtype.kind == "u" and a.size and a.max() > INT64_MAX:
        fail(op, name, "values that fit in int64", f"{a.max()} (dtype {a.dtype})")
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
    a = _asarray(op, name, m)
    if a.dtype != np.bool_:
        fail(op, name, "a bool mask", f"dtype {a.dtype}")
    _check_shape(op, name, a, shape, ndim)
    return a


def _is(value: object, choice: object) -> bool:
    """``value == choice`` for an option: a str only equals a str, a bool only a bool
    (``np.bool_`` included), and an array never matches."""
    if isinstance(choice, bool):
        return isinstance(value, (bool, np.bool_)) and bool(value) == choice
    if isinstance(choice, str):
        return isinstance(value, str) and value == choice
    if isinstance(value, (np.ndarray, bool, np.bool_)) or value is None:
        return value is choice
    try:
        return bool(value == choice)
    except (TypeError, ValueError):
        return False


def flag(op: str, name: str, value: object) -> bool:
    """A bool (Python or NumPy): the one validator of every on/off option."""
    if not isinstance(value, (bool, np.bool_)):
        fail(op, name, "a bool", _short(value))
    return bool(value)


def one_of(op: str, name: str, value: object, choices: Sequence[object]) -> None:
    if not any(_is(value, c) for c in choices):
        fail(op, name, "one of " + ", ".join(repr(c) for c in choices), _short(value))


def integer(op: str, name: str, value: object, *, low: int | None = None,
            high: int | None = INT64_MAX) -> int:
    """A Python or NumPy integer (not a bool) in ``[low, high]``; ``high`` defaults to the
    int64 maximum, since every integer ends up in NumPy arithmetic."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        fail(op, name, "an int", _short(value))
    if low is not None and value < low:
        fail(op, name, f"an int >= {low}", repr(value))
    if high is not None and value > high:
        fail(op, name, f"an int <= {high}", repr(value))
    if value < -INT64_MAX - 1:
        fail(op, name, "an int that fits in int64", repr(value))
    return int(value)


def scores_mask(op: str, m: object, full: tuple[int, int, int, int]) -> np.ndarray | None:
    """An attention ``mask`` (True = attend) that broadcasts to the score matrix
    ``[B, h, L, S]`` = ``full``, or ``None``."""
    out = mask(op, "mask", m)
    if out is not None:
        try:
            ok = out.ndim <= 4 and np.broadcast_shapes(out.shape, full) == full
        except ValueError:
            ok = False
        if not ok:
            fail(op, "mask", f"a shape that broadcasts to [B, h, L, S] = {list(full)}",
                 f"shape {out.shape}")
    return out


def default_scale(op: str, q: np.ndarray, scale: object) -> object:
    """SDPA's ``scale``: ``1/√E`` when ``None`` (``E`` = the last axis of ``q``, ≥ 1)."""
    if scale is not None:
        return scale
    if q.shape[-1] == 0:
        fail(op, "q", "a non-empty last axis (E >= 1)", f"shape {q.shape}")
    return 1.0 / float(np.sqrt(q.shape[-1]))


def real(op: str, name: str, value: object, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, finite: bool = False) -> float:
    """A real scalar in ``[low, high]`` (``(low, high]`` with ``low_open``; never NaN, and
    never ±inf with ``finite``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        fail(op, name, "a real number", _short(value))
    try:
        v = float(value)
    except OverflowError:
        fail(op, name, "a real number within the float64 range", repr(value))
    if finite and not np.isfinite(v):
        fail(op, name, "a finite real number", repr(value))
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


def budget(op: str, name: str, count: int, what: str) -> None:
    """Refuse ``what`` (an output or intermediate of ``count`` elements, sized by argument
    ``name``) when ``count`` exceeds :data:`MAX_ELEMENTS`."""
    if count > MAX_ELEMENTS:
        fail(op, name, f"small enough that the {what} has at most MAX_ELEMENTS = 2**28 "
             "elements", f"{count} elements")


def positive_dims(op: str, name: str, a: np.ndarray, axes: dict[int, str]) -> None:
    """Each axis in ``axes`` (axis -> its symbol, e.g. ``{1: "T"}``) holds at least one
    element."""
    for ax, sym in axes.items():
        if a.shape[ax] < 1:
            fail(op, name, f"at least one element along {sym} ({sym} >= 1)", f"shape {a.shape}")


def cotangent(op: str, cot: object, out: object, where: str = "cotangent") -> None:
    """``cot`` is shaped like the op's output ``out``: a tuple of the same length for a tuple
    output (each member checked the same way), else a float array (or Python/NumPy float)
    of exactly ``out``'s shape. ``None``, integer/bool/complex/object dtypes, broadcastable
    or wrong shapes and a wrong structure are refused."""
    if isinstance(out, tuple):
        if not isinstance(cot, tuple) or len(cot) != len(out):
            got = (f"{type(cot).__name__} of length {len(cot)}"
                   if isinstance(cot, (tuple, list)) else type(cot).__name__)
            fail(op, where, f"a tuple of {len(out)} arrays, like the op's output", got)
        for i, (c, o) in enumerate(zip(cot, out)):
            cotangent(op, c, o, f"{where}[{i}]")
        return
    if cot is None or isinstance(cot, (tuple, list, str, bytes, dict)):
        fail(op, where, f"a float array of shape {list(np.shape(out))}, like the op's output",
             f"{type(cot).__name__} {_short(cot)}")
    c = _asarray(op, where, cot)
    if c.dtype.kind != "f" and c.dtype not in DTYPES.values():
        fail(op, where, "a float array", f"dtype {c.dtype}")
    if c.shape != np.shape(out):
        fail(op, where, f"shape {list(np.shape(out))}, exactly the op's output shape",
             f"shape {list(c.shape)}")
