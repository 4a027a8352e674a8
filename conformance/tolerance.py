"""The tolerance policy, in one place (docs/tolerance.md explains it for readers).

For each output array of an example, with ``r`` the float64 reference on the very
inputs the backend received, ``b`` the backend's answer and ``s`` the *baseline*:

    max|b − r|  ≤  C_BASE · max|s − r|  +  C_FLOOR · √k · u_w · M  +  u_d · max|r|

**Working precision.** Each dtype ``d`` is judged at a working precision ``w``: the
precision its intermediates are computed in (CONTRACT §6, 2026-12-06). float32 and
float64 work in themselves. float16 and bfloat16 are *stored* in the dtype but every
intermediate (sums, dot products, softmax and normalisation statistics, rotary angles,
loss accumulations) is computed in float32, as production kernels do: ``w = float32``.
A backend may declare a documented engine mode (TF32 products for float32), and a
deviation may judge the examples it covers at a coarser ``w`` (its ``bound``).

- ``s`` is the spec's own formula evaluated in ``w`` on the inputs (which are exact in
  ``d``), its output rounded to ``d``: the textbook formula computed the way the model
  says. FlashAttention's gate: a backend may be at most ``C_BASE`` times less accurate.
- ``C_FLOOR·√k·u_w·M`` bounds the rounding of the intermediates: ``u_w`` the unit
  roundoff of the working precision (fp64 2⁻⁵³, fp32 2⁻²⁴, TF32 2⁻¹¹), ``k`` the op's
  reduction length and ``M`` the magnitude of the result as conditioned by its inputs:
  the largest of ``max|r|``, an op-declared input-derived scale (a size per unit of
  relative perturbation, such as the rotary angle's ``max|x|·max|position|``), and the
  *measured* sensitivity ``max|r̃ − r| / u_w`` over the reference evaluations ``r̃`` of
  :mod:`lmspec.conformance.conditioning`, whose perturbations model rounding at ``w``.
- ``u_d·max|r|`` is the output's own rounding to ``d``, present only when ``d`` is
  coarser than ``w`` (the half dtypes).

So in float16/bfloat16 the gate admits what a kernel that rounds once, at its output,
errs, and rejects a kernel that rounds an intermediate to half precision where that
shows (a half accumulator, rotary angles in half, a residual rounded before the norm).
In float32/float64 the last term is absent and ``w = d``: the policy is unchanged.
NaN and ±inf must match position for position, except that a finite reference beyond
the dtype's largest value may be answered with the ±inf it rounds to. ``worst_ratio``
= error / tolerance (≤ 1 passes).

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
POLICY = (f"max|b-r| <= {C_BASE:g}*max|baseline-r| + {C_FLOOR:g}*sqrt(k)*u_w*M + u_d*max|r| "
          "(w = working precision: float32 for float16/bfloat16 (intermediates in float32, "
          "CONTRACT §6), the dtype itself otherwise, or a declared engine mode; baseline = "
          "spec evaluated in w, output rounded to the dtype d; the u_d term only where d is "
          "coarser than w; M = max(max|r|, declared scale, max|r(x̃) - r|/u_w), x̃ = inputs "
          "perturbed normwise ± u_w·max|x| and componentwise x·(1 ± u_w), float "
          "hyperparameters at their w/float32 rounding, literal constants such as fl(1/p) "
          "rounded; NaN/inf positions must match; "
          f"max|r(x̃) - r| measured only where the error exceeds {MEASURED_ABOVE:g} of the "
          "tolerance without it, so ratios below that are upper bounds)")


HALF = ("float16", "bfloat16")
"""The dtypes stored in half precision and computed in float32 (CONTRACT §6)."""

_PRECISION: ContextVar[Mapping[str, str] | None] = ContextVar("lmspec_declared_precision",
                                                              default=None)


@contextmanager
def declared_precision(precision: Mapping[str, str]) -> Iterator[None]:
    """Within this block, dtype ``d`` is judged at the working precision
    ``precision[d]`` (see :func:`working_precision`): a backend that declares it computes
    float32 with TF32 products (``{"float32": "tf32"}``) is judged with TF32's
    ``u = 2⁻¹¹``; a deviation bounded by a working precision judges the examples it
    covers at that precision. Entries stack over an enclosing block's."""
    token = _PRECISION.set({**(_PRECISION.get() or {}), **dict(precision)})
    try:
        yield
    finally:
        _PRECISION.reset(token)


def working_precision(dtype: str) -> str:
    """The precision the intermediates of ``dtype`` are judged at: a declared one (see
    :func:`declared_precision`), else float32 for the half dtypes, else the dtype."""
    declared = (_PRECISION.get() or {}).get(dtype)
    if declared:
        return declared
    return "float32" if dtype in HALF else dtype


def compute_dtype(working: str) -> str:
    """The NumPy dtype that evaluates the spec at ``working`` precision (TF32 is float32
    storage with shorter products: its baseline is float32's, its ``u`` TF32's)."""
    return "float32" if working == "tf32" else working


def coarser(a: str, b: str) -> str:
    """Of two precisions, the one with the larger unit roundoff."""
    return a if UNIT_ROUNDOFF[a] >= UNIT_ROUNDOFF[b] else b


def floor_u(dtype: str, working: str | None = None) -> float:
    """The unit roundoff of the floor: the working precision's (:func:`working_precision`
    unless ``working`` is given)."""
    return UNIT_ROUNDOFF[working or working_precision(dtype)]


def floor(dtype: str, k: int, scale: float, working: str | None = None) -> float:
    """The rounding-error floor ``C_FLOOR·√k·u_w·M``."""
    return C_FLOOR * math.sqrt(max(int(k), 1)) * floor_u(dtype, working) * (scale or 1.0)


def output_rounding(dtype: str, working: str, magnitude: float) -> float:
    """``u_d·max|r|``: the output's own rounding to ``dtype``, where it is coarser than
    the working precision (0 otherwise: the floor already covers it)."""
    u_d, u_w = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[working]
    return u_d * magnitude if u_d > u_w else 0.0


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
            perturbed: object | Callable[[], object] | None = None,
            working: str | None = None, limit: float = 1.0) -> Verdict:
    """Compare ``got`` with the reference ``ref`` under the policy above.

    ``perturbed`` is the reference evaluated on perturbed inputs (see
    :mod:`lmspec.conformance.conditioning`), or a list of such evaluations: the largest
    distance from ``ref``, divided by ``u``, is the measured conditioning of this output,
    and ``M`` is at least that. Given as a function of no arguments, it is called only
    when the error exceeds :data:`MEASURED_ABOVE` of the tolerance without it.
    ``working`` is the working precision (default :func:`working_precision`); ``limit``
    the largest error/tolerance ratio that passes (1; a deviation's ratio bound).
    """
    w = working or working_precision(dtype)
    u_c = UNIT_ROUNDOFF[compute_dtype(w)]
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
    out = output_rounding(dtype, w, mag)
    measured = not callable(perturbed)
    if not measured:  # the tolerance without the measured term is a lower bound of it
        lower = c_base * base_err + (floor(dtype, k, m, w) if m > 0 else 0.0) + out
        if max_abs > MEASURED_ABOVE * lower * limit:
            perturbed, measured = perturbed(), True
    if measured:
        m = max(m, _sensitivity(r, fin, perturbed) / u_c) or 1.0
    tol = c_base * base_err + (floor(dtype, k, m, w) if m > 0 else 0.0) + out
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rel = np.where(fin & (r != 0), err / np.abs(r), np.where(err > 0, np.inf, 0.0))
    max_rel = float(rel.max(initial=0.0))
    ratio = max_abs / tol if tol > 0 else (0.0 if max_abs == 0 else math.inf)
    if ratio <= limit:
        return Verdict(True, max_abs, max_rel, ratio, tol, measured=measured)
    idx = _first(err == max_abs)
    terms = (f"{c_base:g}·baseline err {base_err:.3g} + floor(k={k}, M={m:.3g}, "
             f"u_{w}={UNIT_ROUNDOFF[w]:.3g})")
    if out:
        terms += f" + output rounding {out:.3g}"
    bound = f" × bound {limit:g}" if limit != 1.0 else ""
    return Verdict(False, max_abs, max_rel, ratio, tol,
                   f"{_where(name, idx)}={_fmt(g[idx])}, but should be {_fmt(r[idx])} "
                   f"(|err| {max_abs:.3g} > tolerance {tol:.3g}{bound} = {terms})",
                   measured=measured)


def _sensitivity(r: np.ndarray, fin: np.ndarray, perturbed: object) -> float:
    """``max|r̃ − r|`` over the perturbed evaluations ``r̃`` (finite entries of both)."""
    sens = 0.0
    for q in perturbed if isinstance(perturbed, (list, tuple)) else [perturbed]:
        q = None if q is None else np.asarray(q, dtype=np.float64)
        if q is not None and q.shape == r.shape:
            usable = fin & np.isfinite(q)
            sens = max(sens, float(np.where(usable, np.abs(q - r), 0.0).max(initial=0.0)))
    return sens
