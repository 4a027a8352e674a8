"""How a family declares its conformance inputs and properties.

Each ``lmspec.conformance.cases_<family>`` module declares, for every op of the
family, a Hypothesis strategy of calls (:func:`cases`) and any number of
reference-free properties (:func:`prop`). The harness, the CLI and the reports are
generated from these declarations and the spec catalogue; nothing is written per op
anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st


@dataclass(frozen=True)
class Call:
    """One invocation of an op: positional data arguments and keyword options.

    Arrays (and tuples of arrays, and ``None`` in an array slot) go in ``args``;
    options go in ``kwargs``. Float arrays are already in the dtype under test.
    """

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


Runner = Callable[..., Any]
"""``run(op, *args, **kwargs)``: the implementation under test, outputs as float64/int64
NumPy (tuples stay tuples)."""


@dataclass(frozen=True)
class Close:
    """A property's numeric claim: ``actual ≈ expected`` within the floor tolerance
    ``C·√k·u·M`` of the dtype under test (``M`` defaults to ``max|expected|``, at least 1).
    NaN/±inf positions must match."""

    what: str
    actual: Any
    expected: Any
    k: int = 1
    scale: float | None = None


@dataclass(frozen=True)
class Holds:
    """A property's exact claim: ``ok`` must be true."""

    what: str
    ok: bool
    detail: str = ""


Claim = Close | Holds


@dataclass
class OpCases:
    """The conformance declaration of one op."""

    op: str
    strategy: Callable[[str], st.SearchStrategy[Call]]
    k: Callable[[Call], int]
    scale: Callable[[Call, Any], float] | None = None
    compare: Callable[..., Any] | None = None
    large: Callable[[str], st.SearchStrategy[Call]] | None = None
    """The large-shape tier's inputs (``lmspec run --shapes large``): lengths and widths
    that straddle kernel tile sizes; ``None`` where the op declares none."""


@dataclass
class Property:
    """A reference-free property of one op, checked against every backend."""

    name: str
    op: str
    check: Callable[[Runner, Any, str], Iterable[Claim]]
    strategy: Callable[[str], st.SearchStrategy[Any]] | None = None
    doc: str = ""


CASES: dict[str, OpCases] = {}
PROPERTIES: dict[tuple[str, str], Property] = {}


def last_axis(call: Call) -> int:
    """Default reduction length: the largest last-axis size among the float arguments."""
    sizes = [a.shape[-1] for a in _arrays(call.args) if a.ndim and a.dtype.kind == "f"]
    return max(sizes, default=1)


def _arrays(x: Any) -> Iterable[np.ndarray]:
    if isinstance(x, (tuple, list)):
        for a in x:
            yield from _arrays(a)
    elif isinstance(x, np.ndarray):
        yield x


def cases(op: str, *, k: Callable[[Call], int] = last_axis,
          scale: Callable[[Call, Any], float] | None = None,
          compare: Callable[..., Any] | None = None,
          large: Callable[[str], st.SearchStrategy[Call]] | None = None):
    """Declare ``fn(dtype) -> SearchStrategy[Call]`` as the inputs of ``op``.

    ``k`` gives the reduction length that the floor tolerance grows with (√k);
    ``scale(call, cotangent)`` an input-derived magnitude ``M`` to use when it exceeds
    ``max|reference|`` (``cotangent`` is ``None`` for the forward check): the size of the
    change a relative perturbation ``u`` of the inputs causes in the output, divided by
    ``u`` (e.g. ``max|x|`` for softmax probabilities, which are shift invariant);
    ``compare`` replaces the float comparison (for integer outputs); ``large(dtype)``
    is a second strategy for the large-shape tier (sizes at and around the tile sizes
    of GPU kernels: 64/128-row blocks, vocabulary chunks), used by the forward and vjp
    checks under ``--shapes large``.
    """

    def deco(fn: Callable[[str], st.SearchStrategy[Call]]):
        if op in CASES:
            raise TypeError(f"cases for {op!r} declared twice")
        CASES[op] = OpCases(op, fn, k, scale, compare, large)
        return fn

    return deco


def prop(op: str, name: str | None = None, *,
         strategy: Callable[[str], st.SearchStrategy[Any]] | None = None):
    """Declare ``check(run, drawn, dtype) -> Iterable[Claim]`` as a property of ``op``.

    ``drawn`` comes from ``strategy(dtype)`` (default: the op's own cases, a
    :class:`Call`). The property's name is ``name`` or the function's name.
    """

    def deco(fn):
        pname = name or fn.__name__
        if (op, pname) in PROPERTIES:
            raise TypeError(f"property {pname!r} of {op!r} declared twice")
        doc = (fn.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        PROPERTIES[(op, pname)] = Property(pname, op, fn, strategy, doc)
        return fn

    return deco
