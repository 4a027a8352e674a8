"""Measure a half-precision finding before declaring it (docs/deviations.md).

For one backend op in float16 or bfloat16 this runs the check twice under the deviations
the backend already declares (measure a finding before declaring it), at fixed seeds and
example count:

1. the backend as it is, judged by the float32-intermediate gate (CONTRACT §6): its worst
   error/tolerance ratio outside what is declared is the size a ``bound="float16"``
   (or ``"bfloat16"``) deviation states;
2. the same backend on the inputs widened to float32, its outputs rounded to the dtype:
   if this conforms, the difference is the engine's half intermediates, not its formula.

    python benchmarks/measure_half.py --backend torch-cpu --op window_lm --dtype float16 \\
        --check forward --max-examples 100 --seed 0 --seed 1

Built-in backends are measured in this process (the measurement of a plugin's own
backend is its author's: they can import this module and call :func:`measure`).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmspec._precision import DTYPES
from lmspec.conformance.plan import Settings, Target
from lmspec.conformance.search import run_target


class Widened:
    """``backend`` called on float32 copies of its half inputs, its float outputs rounded
    to ``dtype`` (one rounding, as a kernel with float32 intermediates would give)."""

    def __init__(self, backend: Any, dtype: str):
        self._b, self._dt = backend, np.dtype(DTYPES[dtype])

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._b, name)
        if name.startswith("_") or not callable(attr) or name in ("available", "info"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            out = attr(*(self._up(a) for a in args), **{k: self._up(v) for k, v in kwargs.items()})
            return self._down(out)

        return call

    def _up(self, x: Any) -> Any:
        if isinstance(x, np.ndarray) and x.dtype == self._dt:
            return x.astype(np.float32)
        if isinstance(x, (tuple, list)):
            return type(x)(self._up(v) for v in x)
        return x

    def _down(self, x: Any) -> Any:
        if isinstance(x, np.ndarray) and x.dtype.kind == "f":
            return x.astype(self._dt)
        if isinstance(x, (tuple, list)):
            return type(x)(self._down(v) for v in x)
        return x


def finding_ratio(record: dict[str, Any]) -> float:
    """The error/tolerance ratio of what the declared deviations leave: a failing
    example's (``inf`` for a NaN/inf mismatch), else at most 1 (``worst_ratio`` counts
    the excused examples too, so it cannot say this)."""
    if record["status"] != "fail":
        return min(float(record["worst_ratio"] or 0.0), 1.0)
    m = re.search(r"\|err\| ([0-9.e+-]+) > tolerance ([0-9.e+-]+)", record["message"])
    return float(m.group(1)) / float(m.group(2)) if m else math.inf


def measure(backend: Any, op: str, dtype: str, check: str, examples: int,
            seeds: Sequence[int]) -> dict[str, float]:
    """The worst :func:`finding_ratio` over ``seeds`` (as is, widened), under the
    deviations ``backend`` already declares (the finding is what they leave)."""
    target = Target(backend.name, op, dtype, check)
    declared = getattr(backend, "deviations", None)
    worst = {"as is": 0.0, "widened": 0.0}
    for s in seeds:
        settings = Settings("default", examples, s)
        for label, b in (("as is", backend), ("widened", Widened(backend, dtype))):
            r = run_target(b, target, settings, declared)
            ratio = finding_ratio(r)
            worst[label] = max(worst[label], ratio)
            print(f"seed {s} {label:8s} {r['status']:10s} ratio {ratio:.3g}"
                  f"  ({r['examples']} examples){'' if r['status'] == 'pass' else ': '}"
                  f"{'' if r['status'] == 'pass' else r['message'][:160]}", flush=True)
    return worst


def _builtin(name: str) -> Any:
    from lmspec.backends import builtin

    found: list[Any] = []
    builtin.register_backends(found.append)
    try:
        return next(b for b in found if b.name == name)
    except StopIteration:
        raise SystemExit(f"no built-in backend {name!r}: "
                         f"{', '.join(b.name for b in found)}") from None


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", required=True)
    p.add_argument("--op", required=True)
    p.add_argument("--dtype", required=True, choices=["float16", "bfloat16"])
    p.add_argument("--check", default="forward")
    p.add_argument("--max-examples", type=int, default=100)
    p.add_argument("--seed", type=int, action="append")
    a = p.parse_args(argv)
    worst = measure(_builtin(a.backend), a.op, a.dtype, a.check, a.max_examples,
                    a.seed or [0])
    print(f"{a.backend} {a.op}/{a.check}/{a.dtype}: worst ratio as is {worst['as is']:.3g}, "
          f"widened to float32 {worst['widened']:.3g}")


if __name__ == "__main__":
    main()
