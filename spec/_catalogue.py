"""The op catalogue: each op is declared once, next to its math.

A family module declares an op by decorating its reference forward with
:func:`reference` and its hand-derived vector-Jacobian product with
:func:`vjp_rule`. Everything else (``lmspec.OPS``, ``lmspec.vjp``, the harness,
``lmspec ops``, the reports) reads this catalogue.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

FAMILIES = ("core", "ngram", "recurrent", "attention", "training", "modern", "serving",
            "sampling")

VjpRule = Callable[..., Mapping[str, Any]]


@dataclass
class OpDef:
    """One catalogue entry (CONTRACT §2)."""

    name: str
    family: str
    reference: Callable[..., Any]
    params: tuple[str, ...]
    diff: tuple[str, ...]
    vjp_rule: VjpRule | None = field(default=None, repr=False)

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.reference) or ""
        return doc.split("\n\n", 1)[0].replace("\n", " ")

    @property
    def differentiable(self) -> bool:
        return bool(self.diff)


_CATALOGUE: dict[str, OpDef] = {}
OPS: Mapping[str, OpDef] = MappingProxyType(_CATALOGUE)
"""Every catalogue op by name, in family order (read-only)."""


def reference(family: str, *, diff: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Declare ``fn`` as the reference forward of the op named ``fn.__name__``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")

    def deco(fn: Callable) -> Callable:
        params = tuple(inspect.signature(fn).parameters)
        unknown = set(diff) - set(params)
        if unknown:
            raise TypeError(f"{fn.__name__}: diff names unknown parameters {sorted(unknown)}")
        if fn.__name__ in _CATALOGUE:
            raise TypeError(f"op {fn.__name__!r} declared twice")
        _CATALOGUE[fn.__name__] = OpDef(fn.__name__, family, fn, params, tuple(diff))
        return fn

    return deco


def vjp_rule(forward: Callable) -> Callable[[VjpRule], VjpRule]:
    """Declare the hand-derived vjp of ``forward``.

    The rule is called as ``rule(cotangent, *args, **kwargs)`` with the op's own
    arguments and returns ``{argument name: gradient}`` for the differentiable
    arguments (a tuple of arrays for a tuple argument such as ``weights``).
    """

    def deco(rule: VjpRule) -> VjpRule:
        _CATALOGUE[forward.__name__].vjp_rule = rule
        return rule

    return deco


def get(op: str) -> OpDef:
    try:
        return _CATALOGUE[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; the catalogue has: {', '.join(_CATALOGUE)}") from None
