"""The record of one check: its statistics while the search runs, and the result.

:class:`Stats` accumulates per-example errors, ratios and counts; :class:`CheckResult` is
the result record of CONTRACT §5 (``results`` items), with :meth:`CheckResult.to_json`
and :meth:`CheckResult.from_json`; :func:`jsonable` and :func:`compact` write arrays,
calls and non-finite numbers into JSON-safe data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmspec._precision import DTYPES

from . import tolerance
from .declare import Call

STATUSES = ("pass", "fail", "error", "deviation", "unsupported", "skipped")


MIN_CHECKED_FRACTION = 0.5
"""A check passes outright only when the backend answered at least this fraction of the
examples drawn; fewer (but some) is a *partial* pass, marked with its counts; none is
``unsupported``."""


@dataclass
class Stats:
    examples: int = 0
    unsupported: int = 0
    unsupported_reason: str = ""
    shrink_replays: int = 0
    vacuous: int = 0
    shrinking: bool = False
    deviated: int = 0
    deviation: dict[str, Any] | None = None
    ambiguous: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst_ratio: float = 0.0
    worst_tol: dict[str, Any] = field(default_factory=dict)
    failure: dict[str, Any] | None = None
    ratios: list[float] = field(default_factory=list)
    _example_ratio: float = 0.0

    def add(self, v: tolerance.Verdict, k: int, name: str) -> None:
        self.max_abs = max(self.max_abs, v.max_abs)
        self.max_rel = max(self.max_rel, v.max_rel)
        self._example_ratio = max(self._example_ratio, v.ratio)
        if v.ratio >= self.worst_ratio:
            self.worst_ratio = v.ratio
            self.worst_tol = {"value": v.tol, "k": k, "output": name}

    def begin(self) -> None:
        self._example_ratio = 0.0

    def end(self) -> None:
        if not self.shrinking:
            self.ratios.append(self._example_ratio)


RATIO_EDGES = tuple(x / 2 for x in range(-12, 3))
"""log10 bin edges of the per-example error/tolerance histogram: 1e-6 … 10."""


def ratio_distribution(ratios: Sequence[float]) -> dict[str, Any] | None:
    """Per-example worst ratio (error / tolerance) of a check: quantiles and a log10
    histogram (``below`` counts ratios under 1e-6, zeros included; ``above`` over 10).

    Each quantile is an observed ratio (the smallest ``r`` with at least a fraction ``q``
    of the examples at or below it): interpolating between examples would give NaN next
    to an infinite ratio (a deviating example whose NaN sits where the spec has a number).
    """
    if not ratios:
        return None
    r = np.asarray(ratios, dtype=np.float64)
    logs = np.log10(np.where(r > 0, r, 1e-300))
    counts, _ = np.histogram(logs, bins=RATIO_EDGES)
    return {"edges_log10": list(RATIO_EDGES), "counts": counts.tolist(),
            "below": int((logs < RATIO_EDGES[0]).sum()),
            "above": int((logs > RATIO_EDGES[-1]).sum()),
            "quantiles": {q: jsonable(float(np.quantile(r, float(q), method="inverted_cdf")))
                          for q in ("0.5", "0.9", "0.99", "1")}}


MAX_COUNTEREXAMPLE_ELEMENTS = 10_000
"""Arrays of a counterexample larger than this are summarised in reports (shape, dtype,
range and the first values); the ``reproduce`` command replays the example exactly."""


def compact(x: Any) -> Any:
    if isinstance(x, np.ndarray) and x.size > MAX_COUNTEREXAMPLE_ELEMENTS:
        flat = x.reshape(-1)
        wide = flat.astype(np.float64) if x.dtype == DTYPES["bfloat16"] else flat
        fin = wide[np.isfinite(wide)] if wide.dtype.kind == "f" else wide
        return {"elided": True, "dtype": str(x.dtype), "shape": list(x.shape),
                "min": jsonable(fin.min()) if fin.size else None,
                "max": jsonable(fin.max()) if fin.size else None,
                "first": jsonable(wide[:8].tolist()),
                "note": "array elided in the report; the reproduce command replays it"}
    if isinstance(x, Call):
        return Call(tuple(compact(a) for a in x.args),
                    {k: compact(v) for k, v in x.kwargs.items()})
    if isinstance(x, (tuple, list)):
        return type(x)(compact(a) for a in x)
    if isinstance(x, dict):
        return {k: compact(v) for k, v in x.items()}
    return x


def jsonable(x: Any) -> Any:
    """Arrays, calls and scalars as JSON-safe data (non-finite floats as strings such as
    ``"nan"``/``"inf"``, arrays as ``{"array", "dtype", "shape"}``; anything else by repr)."""
    if isinstance(x, Call):
        return {"args": jsonable(x.args), "kwargs": jsonable(dict(x.kwargs))}
    if isinstance(x, (tuple, list)):
        return [jsonable(a) for a in x]
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        dt = str(x.dtype)
        data = x.astype(np.float64) if x.dtype == DTYPES["bfloat16"] else x
        return {"array": jsonable(data.tolist()), "dtype": dt, "shape": list(x.shape)}
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if math.isfinite(f) else repr(f)
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return repr(x)


@dataclass
class CheckResult:
    """One check's result record (CONTRACT §5, a ``results`` item).

    The contract's fields are attributes; the optional ones a check may add (``partial``,
    ``precision``, ``deviation``, ``deviation_reason``, ``ratio_distribution``,
    ``ambiguous_examples``, ``deviation_examples``, ``backend_output``, a family's
    ``statistics``…) live in :attr:`extra` and sit beside them in the JSON.
    """

    backend: str
    op: str
    dtype: str
    check: str
    status: str = "pass"
    examples: int = 0
    max_abs_err: Any = 0.0
    max_rel_err: Any = 0.0
    worst_ratio: Any = 0.0
    tolerance: dict[str, Any] | None = None
    message: str = ""
    counterexample: Any = None
    reproduce: str | None = None
    duration_s: float | None = None
    unsupported_examples: int | None = None
    shrink_replays: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("backend", "op", "dtype", "check", "status", "examples", "max_abs_err",
              "max_rel_err", "worst_ratio", "tolerance", "message", "counterexample",
              "reproduce")
    """The contract's fields, always written; ``duration_s``, ``unsupported_examples``
    and ``shrink_replays`` are written when known."""

    def to_json(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.FIELDS}
        for name in ("duration_s", "unsupported_examples", "shrink_replays"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckResult:
        known = set(cls.FIELDS) | {"duration_s", "unsupported_examples", "shrink_replays"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    @property
    def id(self) -> str:
        return f"{self.backend}::{self.op}::{self.dtype}::{self.check}"
