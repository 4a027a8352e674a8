"""Hypothesis building blocks shared by the families' strategies.

Every float array is drawn as float64 values and then rounded to the dtype under
test, so the array handed to a backend is exactly representable in its dtype and the
float64 reference sees the very same numbers (see conformance.tolerance). Uniform
draws that must lie in ``[0, 1)`` go through :func:`below_one`, since rounding to the
dtype can carry a value below 1 up to 1 (bfloat16: ``1 − 2⁻⁹``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from hypothesis import strategies as st

from lmspec._precision import DTYPES

FINITE_MAX = {"float16": 65504.0, "bfloat16": 3.0e38, "float32": 3.0e38, "float64": 1.0e300}


def as_dtype(a: np.ndarray | float, dtype: str) -> np.ndarray:
    """Round ``a`` to ``dtype`` (the array a backend receives)."""
    return np.asarray(a, dtype=np.float64).astype(DTYPES[dtype])


def below_one(u: np.ndarray | float, dtype: str) -> np.ndarray:
    """Uniform draws ``u ∈ [0, 1]`` rounded to ``dtype``, those that round up to 1 moved to
    the largest value below 1 (bfloat16 rounds ``1 − 2⁻⁹`` to 1.0): a draw handed to a
    backend lies in ``[0, 1)`` in the dtype under test, as the contract requires."""
    r = as_dtype(u, dtype)
    top = np.nextafter(np.array(1.0, dtype=r.dtype), np.array(0.0, dtype=r.dtype))
    return np.where(r >= 1, top, r).astype(r.dtype)


@lru_cache(maxsize=4096)
def _elements(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@lru_cache(maxsize=4096)
def _special(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.sampled_from(sorted({lo, hi, min(max(0.0, lo), hi)})) | _elements(lo, hi)


def _each(draw, dtype: type, shape: Sequence[int], elements: st.SearchStrategy[Any],
          label: str) -> np.ndarray:
    """An array of ``shape`` whose every element is one draw from ``elements``.

    One choice per element, each shrinking on its own. (``hypothesis.extra.numpy.arrays``
    draws a sparse array over a fill value, about three choices per element: 25 arrays
    of 8 floats took 25.6 ms per example that way, 6.5 ms this way.)
    """
    shape = tuple(int(n) for n in shape)
    n = int(np.prod(shape, dtype=np.int64))
    return np.array([draw(elements, label=label) for _ in range(n)], dtype=dtype).reshape(shape)


@lru_cache(maxsize=4096)
def _integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


@lru_cache(maxsize=4096)
def _sampled(values: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    return st.sampled_from(values)


_SEED = st.integers(0, 2**63 - 1)
_BOOLEANS = st.booleans()

ELEMENTWISE_MAX = 8
"""Arrays of up to this many elements are drawn element by element (Hypothesis shrinks
each value); larger ones from a seed that Hypothesis draws, plus a few elements that it
places and chooses itself (see :func:`floats`)."""


def floats(draw, dtype: str, shape: Sequence[int], lo: float = -3.0, hi: float = 3.0,
           *, label: str = "array") -> np.ndarray:
    """An array of ``shape`` with elements in ``[lo, hi]``, rounded to ``dtype``.

    Small arrays (≤ :data:`ELEMENTWISE_MAX` elements) are drawn element by element, so
    a counterexample shrinks value by value. A larger array — recurrent weights, long
    sequences — would cost Hypothesis one choice per element (the conformance suite's
    largest cost); it is drawn uniformly in ``[lo, hi]`` from a seed Hypothesis draws,
    and then up to four elements at positions Hypothesis chooses get the values it would
    favour (the ends of the range, 0, or any value in it). Shapes are drawn separately,
    so shrinking still reaches the small arrays where counterexamples are read.
    """
    shape = tuple(int(n) for n in shape)
    n = int(np.prod(shape, dtype=np.int64))
    lo, hi = float(lo), float(hi)
    if n <= ELEMENTWISE_MAX:
        return as_dtype(_each(draw, np.float64, shape, _elements(lo, hi), label), dtype)
    seed = draw(_SEED, label=f"{label} seed")
    raw = np.random.default_rng(seed).uniform(lo, hi, size=shape)
    for _ in range(draw(_integers(0, 4), label=f"{label} placed")):
        raw.flat[draw(_integers(0, n - 1), label=f"{label} at")] = draw(
            _special(lo, hi), label=f"{label} value")
    return as_dtype(raw, dtype)


REGIMES = ("normal", "large", "very_negative", "ties", "tiny", "offset")

OFFSETS = (300.0, 2000.0, 1e4)
"""Magnitudes of the common offset of the ``"offset"`` regime of :func:`logits`."""


def logits(draw, dtype: str, shape: Sequence[int], *, label: str = "logits",
           regimes: Sequence[str] = REGIMES) -> np.ndarray:
    """Logit-like values in one of several regimes: ordinary, huge magnitude (overflows a
    naive ``exp``), very negative (underflows), ties, tiny, and ordinary logits plus a
    large common offset ``c`` (``x = c + U(−5, 5)``, ``|c|`` in :data:`OFFSETS`: the
    softmax is unchanged, but ``exp`` without the max shift overflows, and a log-sum-exp
    or loss accumulated in a short format loses the spread to ``c``'s rounding)."""
    regime = draw(_sampled(tuple(regimes)), label=f"{label} regime")
    big = min(FINITE_MAX[dtype] / 4, 1e4)
    if regime == "normal":
        return floats(draw, dtype, shape, -5, 5, label=label)
    if regime == "offset":
        c = draw(_sampled(OFFSETS), label=f"{label} offset") * draw(
            _sampled((1.0, -1.0)), label=f"{label} offset sign")
        c = float(np.clip(c, -big, big))
        return floats(draw, dtype, shape, c - 5, c + 5, label=label)
    if regime == "large":
        return floats(draw, dtype, shape, -big, big, label=label)
    if regime == "very_negative":
        return floats(draw, dtype, shape, -big, -big / 2, label=label)
    if regime == "tiny":
        return floats(draw, dtype, shape, -1e-3, 1e-3, label=label)
    return as_dtype(_each(draw, np.float64, shape, _sampled((-1.0, 0.0, 2.0)), label), dtype)


def ints(draw, shape: Sequence[int], high: int, *, low: int = 0, label: str = "ids") -> np.ndarray:
    """An int64 array of ids in ``[low, high)``."""
    return _each(draw, np.int64, shape, _integers(int(low), int(high) - 1), label)


def bools(draw, shape: Sequence[int], *, label: str = "mask") -> np.ndarray:
    return _each(draw, np.bool_, shape, _BOOLEANS, label)


def dim(draw, lo: int, hi: int, *, label: str) -> int:
    return draw(_integers(int(lo), int(hi)), label=label)


TILES = (8, 16, 32, 64, 128)
"""Common tile and vector widths of kernels (SIMD lanes, warp multiples, GPU blocks)."""
LONG_LENGTHS = tuple(t + 1 for t in TILES)
"""Lengths one past each tile size: a kernel wrong only past its first tile (a second,
partial tile: a running max or sum not carried, a tail left out) shows at these."""
LONG_ONE_IN = 12
"""A reduced axis is one of :data:`LONG_LENGTHS` in about one example in this many."""
_LONG_COIN = st.integers(0, LONG_ONE_IN - 1)


def length(draw, lo: int, hi: int, *, label: str) -> int:
    """The length of a reduced axis (a softmax or norm row, keys, a vocabulary): usually
    in ``[lo, hi]``, and in about one example in :data:`LONG_ONE_IN` (~8 %) one of
    :data:`LONG_LENGTHS` (9, 17, 33, 65, 129), past the tile sizes a short range never
    reaches; the long draw is its own choice, so shrinking falls back to the short range."""
    if draw(_LONG_COIN, label=f"{label} past a tile?") == LONG_ONE_IN - 1:
        return draw(_sampled(LONG_LENGTHS), label=f"{label} (long)")
    return dim(draw, lo, hi, label=label)
