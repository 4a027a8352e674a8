"""The judge of one example: reference, baseline, comparison, claims, deviations.

Given a backend's answer to one drawn example, :func:`compare_outputs` (values and
gradients) and :func:`check_claims` (reference-free properties) decide it under the
tolerance policy of :mod:`lmspec.conformance.tolerance`, at a :class:`Gate` (a working
precision and a ratio limit); :func:`deviation_for` and :func:`excused` apply a backend's
declared deviations (CONTRACT §3): an example is excused only if the deviation's
predicate covers it and it passes at the deviation's bound.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

import lmspec
from lmspec._precision import DTYPES, computing_in

from . import tolerance
from .calls import BackendError, Mismatch, as_result, copy_tree, map_arrays, named, op_kwargs, widen
from .declare import Call, Close, Holds, OpCases
from .plan import Target
from .record import Stats


def reference(op: str, call: Call) -> Any:
    """The float64 reference output for ``call``."""
    kw = op_kwargs(op, call, "float64")
    return as_result(lmspec.OPS[op].reference(*map_arrays(call.args, widen), **kw))


def baseline(op: str, call: Call, dtype: str, cot: Any = None,
             working: str | None = None) -> Any:
    """The spec's own formulas evaluated at the working precision of ``dtype`` on its
    inputs, the outputs rounded to ``dtype`` (``None`` if that cannot be done, or for
    float64 at its own precision, whose baseline would be the reference).

    The working precision (:func:`tolerance.working_precision`) is float32 for float16
    and bfloat16 (CONTRACT §6: half storage, float32 intermediates), the dtype itself
    for float32 and float64, or what a declared engine mode or a deviation's bound says.
    """
    w = tolerance.compute_dtype(working or tolerance.working_precision(dtype))
    if w == "float64":
        return None
    kw = op_kwargs(op, call, dtype)
    try:
        with computing_in(w), np.errstate(all="ignore"):
            if cot is None:
                out = as_result(lmspec.OPS[op].reference(*call.args, **kw))
            else:
                out = as_result(lmspec.vjp(op, call.args, kw, cot))
    except Exception:  # noqa: BLE001 - a baseline that cannot run only removes the gate
        return None
    return rounded(out, dtype) if tolerance.coarser(dtype, w) != w else out


def rounded(x: Any, dtype: str) -> Any:
    """Float outputs rounded to ``dtype`` (kept as float64); others unchanged."""
    if isinstance(x, tuple):
        return tuple(rounded(a, dtype) for a in x)
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        with np.errstate(over="ignore"):
            return x.astype(DTYPES[dtype]).astype(np.float64)
    return x


def perturbed_reference(op: str, call: Call, dtype: str, cot: Any = None,
                        working: str | None = None) -> Any:
    """The measured conditioning's reference evaluations (see conformance.conditioning)."""
    from .conditioning import perturbed_reference as measured

    return measured(op, call, dtype, cot, working)


@dataclass(frozen=True)
class Gate:
    """How one example is judged: at a working precision (``None``: the dtype's, see
    :func:`tolerance.working_precision`) and up to ``limit`` × the tolerance (1; a
    deviation's ratio bound)."""

    working: str | None = None
    limit: float = 1.0


STRICT = Gate()


def compare_outputs(oc: OpCases, call: Call, got: Any, ref: Any, base: Any, dtype: str,
                     stats: Stats, label: str, cot: Any = None,
                     pert: Callable[[], list[Any]] | None = None,
                     gate: Gate = STRICT) -> None:
    """Compare each output array; ``pert`` gives the perturbed reference evaluations of
    the whole output tree, called at most once, and only if an output needs them (see
    :data:`tolerance.MEASURED_ABOVE`)."""
    k = oc.k(call)
    scale = oc.scale(call, cot) if oc.scale else None
    refs, gots = named(ref, label), named(got, label)
    bases = named(base, label) if base is not None else [(n, None) for n, _ in refs]

    def perturbed(i: int) -> Callable[[], list[Any]] | None:
        if pert is None:
            return None
        return lambda: [None if p is None else named(p, label)[i][1] for p in pert()]

    if len(refs) != len(gots):
        raise BackendError(f"{label} has {len(gots)} arrays, but should have {len(refs)}")
    for i, ((name, r), (_, g), (_, s)) in enumerate(zip(refs, gots, bases)):
        if r is None or g is None:
            if (r is None) != (g is None):
                raise BackendError(f"{name} is {'None' if g is None else 'an array'}, "
                                    f"but should be {'None' if r is None else 'an array'}")
            continue
        ra, ga = np.asarray(r), np.asarray(g)
        if ra.dtype.kind in "iub" and ga.dtype.kind not in "iub":
            raise BackendError(f"{name} has dtype {ga.dtype}, but should be an integer array")
        if ra.dtype.kind == "f" and ga.dtype.kind not in "f":
            raise BackendError(f"{name} has dtype {ga.dtype}, but should be a float array")
        if ga.shape != ra.shape:
            raise BackendError(f"{name} has shape {ga.shape}, but should have shape {ra.shape}")
        if oc.compare is not None:
            ok, amb, msg = oc.compare(call, ra, ga, dtype,
                                      lambda kk, m: tolerance.floor(dtype, kk, m, gate.working))
            stats.ambiguous += amb
            if not ok:
                raise Mismatch(msg)
            continue
        v = tolerance.compare(name, ga, ra, s, dtype, k, scale, perturbed=perturbed(i),
                              working=gate.working, limit=gate.limit)
        stats.add(v, k, name)
        if not v.ok:
            raise Mismatch(v.message)


def check_claims(claims: Any, dtype: str, stats: Stats, gate: Gate = STRICT) -> None:
    """A property's claims. ``Close`` compares two outputs of the backend (or one with
    an exact value), each rounded to ``dtype`` at its output: its floor uses the coarser
    of the dtype's and the working precision's unit roundoff."""
    working = tolerance.coarser(dtype, gate.working or tolerance.working_precision(dtype))
    for claim in claims:
        if isinstance(claim, Holds):
            if not claim.ok:
                raise Mismatch(f"{claim.what} does not hold" + (f": {claim.detail}"
                                                                   if claim.detail else ""))
            continue
        assert isinstance(claim, Close), f"a property yielded {claim!r}"
        expected = np.asarray(claim.expected, dtype=np.float64)
        if np.shape(claim.actual) != expected.shape:
            raise BackendError(f"{claim.what}: the backend's output has shape "
                                f"{np.shape(claim.actual)}, but should have shape "
                                f"{expected.shape}")
        scale = claim.scale if claim.scale is not None else max(
            1.0, float(np.abs(expected[np.isfinite(expected)]).max(initial=0.0)))
        v = tolerance.compare(claim.what, claim.actual, expected, None, dtype, claim.k, scale,
                              working=working, limit=gate.limit)
        stats.add(v, claim.k, claim.what)
        if not v.ok:
            raise Mismatch(v.message)


def once(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn``, evaluated on the first call only."""
    memo: list[Any] = []

    def get() -> Any:
        if not memo:
            memo.append(fn())
        return memo[0]

    return get


ENGINE_MODES = frozenset({("float32", "tf32")})
"""The working precisions a backend may declare for a dtype (``precision``): documented
engine modes only (TF32 products for float32, CUDA). Anything else is ignored here and
refused when the backend loads: a declared precision loosens the gate."""


def deviation_key(deviations: Mapping[str, Any], t: Target) -> str | None:
    """The key of a backend's declared deviation for this target, or ``None``: keys
    ``op/check/dtype``, ``op/check``, ``op/*/dtype`` (every check of the op in one dtype)
    and ``op``, the narrowest match winning (CONTRACT §3)."""
    for key in (f"{t.op}/{t.check}/{t.dtype}", f"{t.op}/{t.check}", f"{t.op}/*/{t.dtype}",
                t.op):
        if key in deviations:
            return key
    return None


def deviation_for(deviations: Mapping[str, Any], t: Target) -> Any:
    """The declared deviation for this target (see :func:`deviation_key`): a deviation, a
    tuple of them (several under one key), or ``None``. A deviation with neither a
    predicate nor a bound (a plain reason string among them) covers nothing: the backend
    loader refuses it, and it is never applied here."""
    key = deviation_key(deviations, t)
    dev = None if key is None else deviations[key]
    if isinstance(dev, (tuple, list)):
        parts = tuple(d for d in dev if _bounded(d))
        return parts or None
    return dev if dev is not None and _bounded(dev) else None


def _bounded(dev: Any) -> bool:
    return getattr(dev, "applies", None) is not None or getattr(dev, "bound", None) is not None


def excused(dev: Any, drawn: Any, judge: Callable[[Gate, Stats], None]) -> bool:
    """Does the deviation excuse this example? It must cover it (its predicate) and,
    with a bound, the example must pass at the bound's gate: a ratio (error up to
    ``bound`` × the tolerance) or a working precision (judged as if computed in it).
    Several deviations under one key excuse what any of them excuses."""
    if isinstance(dev, tuple):
        return any(excused(d, drawn, judge) for d in dev)
    if not covers(dev, drawn):
        return False
    bound = getattr(dev, "bound", None)
    if bound is None:
        return True
    gate = Gate(working=bound) if isinstance(bound, str) else Gate(limit=float(bound))
    try:
        with np.errstate(all="ignore"):
            judge(gate, Stats())
    except Mismatch:
        return False
    return True


def covers(dev: Any, drawn: Any) -> bool:
    """Does the deviation's predicate cover this example? (None covers every example; a
    predicate that raises covers nothing.)"""
    applies = getattr(dev, "applies", None)
    if applies is None:
        return True
    args, kwargs = (drawn.args, dict(drawn.kwargs)) if isinstance(drawn, Call) else (
        (drawn,), {})
    try:
        return bool(applies(copy_tree(tuple(args)), copy_tree(kwargs)))
    except Exception:  # noqa: BLE001
        return False


def describe_deviation(key: str | None, dev: Any) -> dict[str, Any]:
    """A declared deviation as reports list it: key, reason, whether it has a predicate,
    and its bound (a ratio, a working precision, or ``None``); several under one key as
    ``parts``."""
    if isinstance(dev, tuple):
        parts = [describe_deviation(key, d) for d in dev]
        return {"key": key, "reason": "; ".join(p["reason"] for p in parts), "parts": parts}
    bound = getattr(dev, "bound", None)
    return {"key": key, "reason": str(getattr(dev, "reason", dev)),
            "predicate": getattr(dev, "applies", None) is not None,
            "bound": bound if isinstance(bound, str) or bound is None else float(bound)}
