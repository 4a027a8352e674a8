"""The tolerance policy, in one place (the README explains it for readers of reports).

For each output array of an example, with ``r`` the float64 reference on the very
inputs the backend received, ``b`` the backend's answer and ``s`` the spec's own
formulas evaluated in the dtype under test (the *baseline*):

    max|b − r|  ≤  C_BASE · max|s − r|  +  C_FLOOR · √k · u · M

``u`` is the unit roundoff of the dtype (fp64 2⁻⁵³, fp32 2⁻²⁴, fp16 2⁻¹¹, bf16 2⁻⁸),
``k`` the op's reduction length and ``M`` the magnitude of the result as conditioned
by its inputs: the largest of ``max|r|``, an op-declared input-derived scale, and the
*measured* sensitivity ``max|r̃ − r| / u`` over the reference evaluations ``r̃`` of
:mod:`lmspec.conformance.conditioning` (1 when all are 0): the data a backward-stable
implementation of the literal formula effectively computes with — inputs perturbed
normwise (``±u·max|x|``) and componentwise (``x·(1 ± u)``, random and checkerboard
signs), float hyperparameters at their dtype or float32 representation, and constants
of the literal formula (the p-norm's ``fl(1/p)``) rounded. The last makes the floor
follow the op's conditioning wherever it is (cancellation to an exact 0, long
recurrences, normalisation of near-constant rows) without a hand-derived bound per op.
The first term is FlashAttention's gate: a backend may be at most ``C_BASE`` times less
accurate than the textbook formula run in the same precision. The second is a
rounding-error bound for a length-``k`` reduction with random-walk growth. NaN and
±inf must match position for position, except that a finite reference beyond the
dtype's largest value may be answered with the ±inf it rounds to. ``worst_ratio`` =
error / tolerance (≤ 1 passes).

The measured term only ever raises the tolerance, so the conformance harness measures
it lazily: an example whose error is at most :data:`MEASURED_ABOVE` of the tolerance
without it passes whatever the measurement would say, and is judged against that
smaller tolerance without the perturbed evaluations. Verdicts are the same as with
every example measured, and so is every ratio above :data:`MEASURED_ABOVE`; a ratio
below it is an upper bound of the measured one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

from lmspec._precision import DTYPES, UNIT_ROUNDOFF

C_BASE = 2.0
C_FLOOR = 4.0
MEASURED_ABOVE = 0.1
"""The harness measures an example's conditioning only when its error exceeds this
fraction of the tolerance without the measured term (see the module docstring)."""
POLICY = (f"max|b-r| <= {C_BASE:g}*max|baseline-r| + {C_FLOOR:g}*sqrt(k)*u*M "
          "(baseline = spec evaluated in the dtype under test; M = max(max|r|, declared scale, "
          "max|r(x̃) - r|/u), x̃ = inputs perturbed normwise ± u·max|x| and componentwise "
          "x·(1 ± u), float hyperparameters at their dtype/float32 rounding, literal "
          "constants such as fl(1/p) rounded; NaN/inf positions must match; "
          f"max|r(x̃) - r| measured only where the error exceeds {MEASURED_ABOVE:g} of the "
          "tolerance without it, so ratios below that are upper bounds)")


_PRECISION: ContextVar[Mapping[str, str] | None] = ContextVar("lmspec_declared_precision",
                                                              default=None)


@contextmanager
def declared_precision(precision: Mapping[str, str]) -> Iterator[None]:
    """Within this block, the floor of dtype ``d`` uses the unit roundoff of
    ``precision[d]``: a backend that declares it computes float32 with TF32 products
    (``{"float32": "tf32"}``) is judged against TF32's ``u = 2⁻¹¹``, not float32's. The
    baseline gate is unchanged (the spec in the storage dtype)."""
    token = _PRECISION.set(dict(precision))
    try:
        yield
    finally:
        _PRECISION.reset(token)


def floor_u(dtype: str) -> float:
    """The unit roundoff of the floor: the dtype's, or the declared working precision's."""
    return UNIT_ROUNDOFF[(_PRECISION.get() or {}).get(dtype, dtype)]


def floor(dtype: str, k: int, scale: float) -> float:
    """The rounding-error floor ``C_FLOOR·√k·u·M``."""
    return C_FLOOR * math.sqrt(max(int(k), 1)) * floor_u(dtype) * (scale or 1.0)


@dataclass
class Verdict:
    """Outcome of comparing one output array."""

    ok: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    ratio: float = 0.0
    tol: float = 0.0
    message: str = ""
    measured: bool = True
    """Whether the perturbed evaluations entered ``tol`` (see :data:`MEASURED_ABOVE`)."""


def _fmt(x: float) -> str:
    return f"{x:.9g}"


def _first(bad: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(bad)[0]) if bad.ndim else ()


def _where(name: str, idx: tuple[int, ...]) -> str:
    return f"{name}[{','.join(map(str, idx))}]" if idx else name


def compare(name: str, got: object, ref: object, base: object | None, dtype: str, k: int,
            scale: float | None = None, *, c_base: float = C_BASE,
            perturbed: object | Callable[[], object] | None = None) -> Verdict:
    """Compare ``got`` with the reference ``ref`` under the policy above.

    ``perturbed`` is the reference evaluated on perturbed inputs (see
    :mod:`lmspec.conformance.conditioning`), or a list of such evaluations: the largest
    distance from ``ref``, divided by ``u``, is the measured conditioning of this output,
    and ``M`` is at least that. Given as a function of no arguments, it is called only
    when the error exceeds :data:`MEASURED_ABOVE` of the tolerance without it.
    """
    g = np.asarray(got, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if g.shape != r.shape:
        return Verdict(False, math.inf, math.inf, math.inf, 0.0,
                       f"{name} has shape {g.shape}, but should have shape {r.shape}")
    with np.errstate(over="ignore"):
        rounded = r.astype(DTYPES[dtype]).astype(np.float64)
    overflow = np.isfinite(r) & np.isinf(rounded) & (g == rounded)
    same_special = (np.isnan(g) == np.isnan(r)) & (np.isposinf(g) == np.isposinf(r)) & (
        np.isneginf(g) == np.isneginf(r)) | overflow
    if not same_special.all():
        idx = _first(~same_special)
        return Verdict(False, math.inf, math.inf, math.inf, 0.0,
                       f"{_where(name, idx)}={_fmt(g[idx])}, but should be {_fmt(r[idx])} "
                       "(NaN/inf positions must match)")
    fin = np.isfinite(r) & ~overflow
    with np.errstate(invalid="ignore"):
        err = np.where(fin, np.abs(g - r), 0.0)
    max_abs = float(err.max(initial=0.0))
    mag = float(np.abs(np.where(fin, r, 0.0)).max(initial=0.0))
    base_err = 0.0
    if base is not None:
        s = np.asarray(base, dtype=np.float64)
        if s.shape == r.shape:
            usable = fin & np.isfinite(s)
            base_err = float(np.where(usable, np.abs(s - r), 0.0).max(initial=0.0))
    m = max(mag, scale or 0.0)
    measured = not callable(perturbed)
    if not measured:  # the tolerance without the measured term is a lower bound of it
        lower = c_base * base_err + (floor(dtype, k, m) if m > 0 else 0.0)
        if max_abs > MEASURED_ABOVE * lower:
            perturbed, measured = perturbed(), True
    if measured:
        m = max(m, _sensitivity(r, fin, perturbed) / UNIT_ROUNDOFF[dtype]) or 1.0
    tol = c_base * base_err + (floor(dtype, k, m) if m > 0 else 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rel = np.where(fin & (r != 0), err / np.abs(r), np.where(err > 0, np.inf, 0.0))
    max_rel = float(rel.max(initial=0.0))
    ratio = max_abs / tol if tol > 0 else (0.0 if max_abs == 0 else math.inf)
    if ratio <= 1.0:
        return Verdict(True, max_abs, max_rel, ratio, tol, measured=measured)
    idx = _first(err == max_abs)
    return Verdict(False, max_abs, max_rel, ratio, tol,
                   f"{_where(name, idx)}={_fmt(g[idx])}, but should be {_fmt(r[idx])} "
                   f"(|err| {max_abs:.3g} > tolerance {tol:.3g}: {c_base:g}*baseline err "
                   f"{base_err:.3g} + floor(k={k}, M={m:.3g}))", measured=measured)


def _sensitivity(r: np.ndarray, fin: np.ndarray, perturbed: object) -> float:
    """``max|r̃ − r|`` over the perturbed evaluations ``r̃`` (finite entries of both)."""
    sens = 0.0
    for q in perturbed if isinstance(perturbed, (list, tuple)) else [perturbed]:
        q = None if q is None else np.asarray(q, dtype=np.float64)
        if q is not None and q.shape == r.shape:
            usable = fin & np.isfinite(q)
            sens = max(sens, float(np.where(usable, np.abs(q - r), 0.0).max(initial=0.0)))
    return sens
