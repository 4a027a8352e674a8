"""``lmspec.vjp``: the reference gradient, in the same form as a backend's ``vjp`` (§3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._catalogue import get


def vjp(op: str, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None,
        cotangent: Any = None) -> tuple[Any, ...]:
    """Pull ``cotangent`` (shaped like the op's output) back through ``op``.

    Returns one entry per positional argument in ``args``: the float64 gradient for a
    differentiable array, a tuple of gradients for a tuple argument (``weights``),
    ``None`` for everything else (integer ids, masks, options, a ``None`` argument).
    """
    d = get(op)
    if d.vjp_rule is None:
        raise ValueError(f"{op}: the op is not differentiable (no vjp)")
    kwargs = dict(kwargs or {})
    if len(args) > len(d.params):
        raise ValueError(f"{op}: takes at most {len(d.params)} positional arguments, "
                         f"got {len(args)}")
    grads = d.vjp_rule(cotangent, *args, **kwargs)
    return tuple(
        grads.get(name) if name in d.diff and arg is not None else None
        for name, arg in zip(d.params, args)
    )
