"""``lmspec.vjp``: the reference gradient, in the same form as a backend's ``vjp`` (§3)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _validate as v
from ._catalogue import get


def _bind(op: str, params: tuple[str, ...], fn: Any, args: Any, kwargs: Any) -> None:
    """``args`` is a tuple/list and ``kwargs`` a mapping that together bind to the op's
    signature (no unknown, duplicate or missing argument)."""
    if not isinstance(args, (tuple, list)):
        v.fail(op, "args", "a tuple of the op's positional arguments", type(args).__name__)
    if not isinstance(kwargs, Mapping):
        v.fail(op, "kwargs", "a mapping of keyword arguments", type(kwargs).__name__)
    if len(args) > len(params):
        v.fail(op, "args", f"at most {len(params)} positional arguments", f"{len(args)}")
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        v.fail(op, "args", f"arguments that match {op}{inspect.signature(fn)}", str(e))


def vjp(op: str, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None,
        cotangent: Any = None) -> tuple[Any, ...]:
    """Pull ``cotangent`` (shaped like the op's output) back through ``op``.

    Returns one entry per positional argument in ``args``: the float64 gradient for a
    differentiable array, a tuple of gradients for a tuple argument (``weights``),
    ``None`` for everything else (integer ids, masks, options, a ``None`` argument).

    The call is checked first, every problem a ``ValueError`` naming the op: ``args`` and
    ``kwargs`` must bind to the op's signature; the arguments are validated by running the
    forward (whose output fixes the cotangent's form); and ``cotangent`` must have exactly
    that form: a tuple of as many members for a tuple output (``(∂out, ∂h_n)`` of ``rnn``),
    otherwise a float array (a Python float for a scalar output) of exactly the output's
    shape, in any float dtype. ``None``, a broadcastable shape (``[1, V]`` for ``[N, V]``),
    an integer, bool, complex or object dtype and a wrong structure are refused.
    """
    d = get(op)
    if d.vjp_rule is None:
        raise ValueError(f"{op}: the op is not differentiable (no vjp)")
    kwargs = {} if kwargs is None else kwargs
    _bind(op, d.params, d.reference, args, kwargs)
    kwargs = dict(kwargs)
    with np.errstate(all="ignore"):
        out = d.reference(*args, **kwargs)
    v.cotangent(op, cotangent, out)
    return pullback(op, args, kwargs, cotangent)


def pullback(op: str, args: Sequence[Any], kwargs: Mapping[str, Any],
             cotangent: Any) -> tuple[Any, ...]:
    """:func:`vjp` without its checks: for a caller that has just run the forward on
    these very ``args`` and ``kwargs`` and shaped ``cotangent`` from its output (the
    conformance harness), which would otherwise pay for the forward twice."""
    d = get(op)
    grads = d.vjp_rule(cotangent, *args, **dict(kwargs))
    return tuple(
        grads.get(name) if name in d.diff and arg is not None else None
        for name, arg in zip(d.params, args)
    )
