"""Shared fixtures: outsider-style mutant backends run through the real harness."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import pytest

from lmspec.backends.torch_backend import TorchBackend
from lmspec.conformance.harness import Settings, Target, checks_of, run_target


class MutantBackend(TorchBackend):
    """torch-cpu with some ops replaced by (buggy) torch functions; no documented
    deviations, like an outsider's backend."""

    def __init__(self, overrides: dict[str, Callable[..., Any]], name: str = "mutant"):
        super().__init__(name, "cpu", ("float32", "float64"))
        self._overrides = overrides

    @cached_property
    def _impls(self) -> dict[str, Callable[..., Any]]:
        return {**TorchBackend._impls.func(self), **self._overrides}

    @cached_property
    def deviations(self) -> dict[str, str]:  # type: ignore[override]
        return {}


def run_checks(backend: Any, op: str, dtypes: Sequence[str] = ("float64",),
               checks: Sequence[str] | None = None, max_examples: int = 100,
               seed: int = 0) -> list[dict[str, Any]]:
    """Run ``op``'s checks (all by default) on ``backend`` and return the result records."""
    config = Settings(max_examples=max_examples, seed=seed)
    return [run_target(backend, Target(backend.name, op, dt, c), config,
                       dict(getattr(backend, "deviations", {}) or {}))
            for dt in dtypes for c in (checks or checks_of(op))]


@pytest.fixture
def run_mutant():
    """``run_mutant(op, torch_fn, dtypes=("float64",), checks=None, max_examples=100)``:
    the results of ``op``'s checks on torch-cpu with ``op`` replaced by ``torch_fn``."""

    def run(op: str, torch_fn: Callable[..., Any], dtypes: Sequence[str] = ("float64",),
            checks: Sequence[str] | None = None, max_examples: int = 100) -> list[dict[str, Any]]:
        return run_checks(MutantBackend({op: torch_fn}), op, dtypes, checks, max_examples)

    return run


def central_difference_vjp(f: Callable[..., Any], args: Sequence[Any], index: int,
                           cotangent: Any, h: float = 1e-6, member: int | None = None):
    """``⟨cotangent, ∂f/∂args[index]⟩`` by float64 central differences (the oracle for
    every hand-derived vjp). ``member`` picks one array of a tuple argument."""
    import numpy as np

    args = [tuple(np.array(m, dtype=np.float64) for m in a) if isinstance(a, tuple) else a
            for a in args]
    target = args[index][member] if member is not None else args[index]
    x = np.array(target, dtype=np.float64)
    grad = np.zeros_like(x)

    def value(xv: Any) -> float:
        a = list(args)
        if member is not None:
            a[index] = tuple(xv if j == member else m for j, m in enumerate(args[index]))
        else:
            a[index] = xv
        out = f(*a)
        outs = out if isinstance(out, tuple) else (out,)
        cots = cotangent if isinstance(out, tuple) else (cotangent,)
        return float(sum(np.sum(np.asarray(c) * np.asarray(o)) for c, o in zip(cots, outs)))

    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        grad[i] = (value(xp) - value(xm)) / (2 * h)
    return grad


@pytest.fixture
def fd_vjp():
    """The :func:`central_difference_vjp` oracle."""
    return central_difference_vjp
