"""Shared fixtures: outsider-style mutant backends run through the real harness."""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import pytest

from lmspec.backends.torch_backend import TorchBackend
from lmspec.conformance.harness import Settings, Target, checks_of, run_target


def _uses_torch(fn: Callable[..., Any]) -> bool:
    """The test names torch (``torch-cpu``, ``TorchBackend``, ``run_mutant`` …) in its body
    or in a module constant it reads (``QUICK = ["run", "--backend", "torch-cpu", …]``)."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    if "torch" in src or "run_mutant" in src or "MutantBackend" in src:
        return True
    consts = (fn.__globals__.get(n) for n in fn.__code__.co_names)
    return any("torch" in repr(c) for c in consts if isinstance(c, (str, list, tuple)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without torch (``pip install lmspec`` has no engine), the tests that run a torch
    backend skip; engine test modules also skip themselves with ``importorskip``."""
    if importlib.util.find_spec("torch") is not None:
        return
    skip = pytest.mark.skip(reason="torch is not installed (pip install 'lmspec[torch]')")
    for item in items:
        fn = getattr(item, "function", None)
        if fn is not None and _uses_torch(fn):
            item.add_marker(skip)


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


SANDBOX_VARIABLES = ("LMSPEC_SANDBOX", "LMSPEC_SANDBOX_NETWORK")


@pytest.fixture(autouse=True)
def _sandbox_choice_stays_in_its_test():
    """``lmspec run`` called in-process records its ``--sandbox`` in the environment for
    the hosts it starts; without this, a test's ``--sandbox none`` would leak into every
    later subprocess of the same worker (and a planted ``.pth`` in a concurrent test would
    then stop their reports)."""
    before = {k: os.environ.get(k) for k in SANDBOX_VARIABLES}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def run_mutant():
    """``run_mutant(op, torch_fn, dtypes=("float64",), checks=None, max_examples=100)``:
    the results of ``op``'s checks on torch-cpu with ``op`` replaced by ``torch_fn``."""

    def run(op: str, torch_fn: Callable[..., Any], dtypes: Sequence[str] = ("float64",),
            checks: Sequence[str] | None = None, max_examples: int = 100) -> list[dict[str, Any]]:
        pytest.importorskip("torch")
        return run_checks(MutantBackend({op: torch_fn}), op, dtypes, checks, max_examples)

    return run



@pytest.fixture
def fd_vjp():
    """The finite-difference oracle, ``fd_vjp(op, args, kwargs, cot) -> tuple`` in the form
    of ``lmspec.vjp`` (see :mod:`lmspec.conformance.oracles`)."""
    from lmspec.conformance.oracles import finite_difference_vjp

    return finite_difference_vjp
