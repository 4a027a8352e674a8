"""The Backend protocol (CONTRACT §3), for type checkers and plugin authors.

Only ``name``, ``device`` and ``dtypes`` are required; op methods carry the catalogue
signatures (``backend.softmax(x, axis=-1)``); a missing method means "unsupported".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    name: str
    device: str
    dtypes: tuple[str, ...]


class SupportsVjp(Protocol):
    def vjp(self, op: str, args: Sequence[Any], kwargs: Mapping[str, Any],
            cotangent: Any) -> tuple[Any, ...]: ...


class SupportsInfo(Protocol):
    def info(self) -> dict[str, Any]: ...


class SupportsAvailable(Protocol):
    def available(self) -> tuple[bool, str]: ...


WORKING_PRECISIONS = ("float16", "bfloat16", "tf32", "float32", "float64")
"""The working precisions a deviation's ``bound`` may name (coarsest first)."""


@dataclass(frozen=True)
class Deviation:
    """A documented, narrow difference between a backend and the spec (CONTRACT §3).

    A backend's ``deviations`` maps a key to a ``Deviation``. Keys, the narrowest match
    winning: ``"op/check/dtype"``, ``"op/check"``, ``"op/*/dtype"`` (every check of the
    op in that dtype), ``"op"``. A ``Deviation`` says which examples it covers and how
    far the backend may be off on them:

    - ``applies(args, kwargs) -> bool`` selects the examples (``args``/``kwargs`` exactly
      as the op received them); ``None`` covers every example of its key;
    - ``bound`` is either a number ``c > 1`` (the backend may err up to ``c`` times the
      tolerance: error/tolerance ≤ ``c``) or the name of a working precision
      (``"float16"``, ``"bfloat16"``, ``"tf32"``, ``"float32"``): the example is judged
      as if the op had been computed entirely in that precision — the spec's formula in
      it as the baseline, its unit roundoff in the floor. ``None``: no bound (the
      predicate alone decides).

    An example that the predicate excludes, or whose error exceeds the bound, is judged
    as usual and can ``fail``. A key may also hold a tuple of deviations (a working-
    precision bound for an engine's half-precision intermediates beside a predicate for
    the inputs where it returns NaN): an example is excused when any of them excuses it.
    A deviation with neither a predicate nor a bound would
    excuse every example of a check, whatever the error: it is refused (``ValueError``
    here; a plain-string deviation is refused when the backend loads).
    """

    reason: str
    applies: Callable[[Sequence[Any], Mapping[str, Any]], bool] | None = None
    bound: float | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError("Deviation: reason must be a non-empty string explaining the "
                             "difference")
        if self.applies is not None and not callable(self.applies):
            raise ValueError(f"Deviation: applies must be a callable (args, kwargs) -> bool "
                             f"or None, got {type(self.applies).__name__}")
        b = self.bound
        if isinstance(b, str):
            if b not in WORKING_PRECISIONS:
                raise ValueError(f"Deviation: bound {b!r} is not a working precision; "
                                 f"expected one of {', '.join(WORKING_PRECISIONS)} or a "
                                 "ratio > 1")
        elif b is not None:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not (
                    math.isfinite(b) and b > 1):
                raise ValueError(f"Deviation: bound must be a finite ratio > 1 (error / "
                                 f"tolerance) or a working precision name, got {b!r}")
        if self.applies is None and self.bound is None:
            raise ValueError(f"Deviation {self.reason[:60]!r}: neither a predicate "
                             "(applies=) nor a bound (bound=); it would excuse every example "
                             "of its checks whatever the error, so it is refused")

    def describe(self) -> str:
        """``"predicate"``, ``"bound 4"``, ``"precision float16"`` … for reports."""
        parts = ["predicate"] if self.applies is not None else []
        if isinstance(self.bound, str):
            parts.append(f"precision {self.bound}")
        elif self.bound is not None:
            parts.append(f"bound {self.bound:g}× tolerance")
        return ", ".join(parts)
