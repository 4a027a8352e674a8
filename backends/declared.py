"""Deviation declarations shared by the built-in engine backends (no engine import).

Each engine's family modules declare where its kernels depart from the spec; what is
the same across engines lives here once: the one-element-axis NaN of a max-shifted
softmax, the half-precision intermediates bound, and the tuple of a narrower key with
the predicates of the broader keys it would otherwise shadow (CONTRACT §3).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import lmspec
from lmspec import Deviation


def one_element_infinity(args, kwargs) -> bool:
    """The reduced axis has one element and some element of ``x`` is ±inf."""
    x = np.asarray(args[0] if args else kwargs["x"])
    axis = kwargs.get("axis", args[1] if len(args) > 1 else -1)
    return bool(x.ndim and x.shape[axis] == 1
                and np.isinf(x.astype(np.float64)).any())


ONE_ELEMENT = (
    "{engine} over a one-element axis computes exp(x − max) = exp(±inf ∓ inf) = NaN for an "
    "infinite element, where the spec (CONTRACT §6, 2026-12-06) gives softmax 1, "
    "log_softmax 0 and logsumexp the value with gradient 1: measured softmax([−inf]) and "
    "softmax([+inf]) NaN, log_softmax likewise, their gradients NaN, logsumexp([−inf]) = −inf "
    "(correct) with gradient NaN. Covered: examples whose reduced axis has one element and "
    "holds an infinity.")


def one_element_deviations(engine: str, vjp: bool = True) -> dict[str, Deviation]:
    """softmax, log_softmax (and logsumexp's vjp) of ``engine`` on a lone ±inf."""
    why = ONE_ELEMENT.format(engine=engine)
    out = {op: Deviation(why, applies=one_element_infinity)
           for op in ("softmax", "log_softmax")}
    if vjp:
        out["logsumexp/vjp"] = Deviation(why, applies=one_element_infinity)
    return out


def half_intermediates(key: str, why: str, ratios: Mapping[str, float], measured: str,
                       widened: str) -> dict[str, Deviation]:
    """Deviations ``key.format(dtype=d)`` for the half dtypes ``d`` in ``ratios``: the
    engine rounds intermediates of the op to ``d`` (``why``), so the examples are judged
    as if the op were computed in ``d`` (``bound=d``); ``ratios`` are the worst
    error/tolerance ratios ``measured`` under the float32-intermediate gate (CONTRACT §6,
    2026-12-06), and ``widened`` the worst ratio of the same backend on float32-widened
    inputs."""
    return {key.format(dtype=d): Deviation(
        f"{why} Measured ({measured}): worst error/tolerance "
        f"{r:.3g} against the float32-intermediate model in {d}, while the same backend on "
        f"the inputs widened to float32, its output rounded to {d}, conforms (worst ratio "
        f"≤ {widened}): the difference is {d} intermediates. Judged at {d} working precision.",
        bound=d) for d, r in ratios.items()}


def _parts(dev: Any) -> tuple[Deviation, ...]:
    return dev if isinstance(dev, tuple) else (dev,)


def merged(*groups: Mapping[str, Any]) -> dict[str, Any]:
    """The deviations of ``groups`` together: a key declared in several holds all of
    them (a tuple), where ``|`` would keep only the last."""
    out: dict[str, Any] = {}
    for group in groups:
        for key, dev in group.items():
            out[key] = _parts(out[key]) + _parts(dev) if key in out else dev
    return out


def with_broader_predicates(devs: Mapping[str, Any]) -> dict[str, Any]:
    """``devs`` with each narrower key also holding the predicate deviations of the broader
    keys it shadows (``op/check/dtype`` shadows ``op/check``, ``op/*/dtype`` and ``op``;
    ``op/*/dtype`` and ``op/check`` shadow ``op``): the narrowest key wins in the judge, so
    without this a bound (half precision, or float64 judged at float32) would hide a
    predicate measured in every dtype (NaN inputs, a query with no key). Each such key
    holds a tuple; an example is excused when any part excuses it."""
    out = dict(devs)
    for key, dev in devs.items():
        op, *rest = key.split("/")
        if not rest:
            continue
        broader = ([f"{op}/{rest[0]}", f"{op}/*/{rest[1]}", op]
                   if len(rest) == 2 and rest[0] != "*" else [op])
        mine = _parts(dev)
        extra = tuple(d for b in broader if b in devs for d in _parts(devs[b])
                      if d.applies is not None and d not in mine)
        if extra:
            out[key] = mine + extra
    return out


def call_arguments(op: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of a call of ``op`` by name, defaults filled in, from an example of any
    of its checks: a forward or vjp example's ``(args, kwargs)``, or a property's draw (one
    positional tuple whose first element is the op's call)."""
    if len(args) == 1 and not kwargs and isinstance(args[0], tuple) and args[0] \
            and hasattr(args[0][0], "args"):
        args, kwargs = tuple(args[0][0].args), dict(args[0][0].kwargs)
    bound = inspect.signature(lmspec.OPS[op].reference).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def kl_backward_overflows(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """float16 distillation examples where the KL backward's product of the cotangent
    (|cot| ≤ 2, as drawn) by ``(1 − α)·T²/N·(ln p − ln q)`` can pass 65504: ``2·|1 − α|·T²/N
    ·max|ln p − ln q| ≥ 65504`` with p, q the teacher's and student's softmax at T."""
    a = call_arguments("distillation_loss", args, kwargs)
    s, t = (np.asarray(a[n]).astype(np.float64) for n in ("student_logits", "teacher_logits"))
    T, alpha = float(a["temperature"]), float(a["alpha"])

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z / T
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    with np.errstate(all="ignore"):
        gap = np.nanmax(np.abs(log_softmax(t) - log_softmax(s)), initial=0.0)
    return bool(2 * abs(1 - alpha) * T * T / s.shape[0] * gap >= 65504)
