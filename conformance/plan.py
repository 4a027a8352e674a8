"""What a run checks: profiles, targets and settings, from one source.

:data:`PROFILES` (and :data:`LARGE_PROFILES`) give the examples per check of each
``--profile``; :class:`Target` is one (backend, op, dtype, check); :func:`checks_of` and
:func:`targets` derive the checks from the catalogue (``lmspec.OPS``) and the families'
conformance declarations (``cases_*``), which importing this module loads. The CLI, the
pytest plugins, the API and the docs read these names.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lmspec
from lmspec._precision import DTYPES
from lmspec.backends.remote import DEFAULT_TIMEOUT_S

from .declare import PROPERTIES
from .profiles import LARGE_PROFILES, PROFILES

for _fam in lmspec.FAMILIES:  # importing the declarations declares every family's cases
    importlib.import_module(f"lmspec.conformance.cases_{_fam}")

@dataclass(frozen=True)
class Target:
    backend: str
    op: str
    dtype: str
    check: str

    @property
    def id(self) -> str:
        return f"{self.backend}::{self.op}::{self.dtype}::{self.check}"


@dataclass
class Settings:
    profile: str = "default"
    max_examples: int | None = None
    seed: int = 0
    call_timeout_s: float = DEFAULT_TIMEOUT_S
    replay_args: Sequence[str] = ()
    shapes: str = "small"
    """``"small"`` (each op's own strategy) or ``"large"`` (its large-shape tier)."""

    @property
    def examples(self) -> int:
        """Examples per check: ``--max-examples``, else the profile's count
        (:data:`PROFILES`, or :data:`LARGE_PROFILES` for the large tier)."""
        if self.max_examples is not None:
            return self.max_examples
        return (LARGE_PROFILES if self.shapes == "large" else PROFILES)[self.profile]


def checks_of(op: str) -> list[str]:
    """The checks run for ``op``: forward, vjp if differentiable, then its properties."""
    out = ["forward"]
    if lmspec.OPS[op].diff:
        out.append("vjp")
    out += [name for (o, name) in PROPERTIES if o == op]
    return out


def targets(backends: Sequence[Any], ops: Sequence[str], dtypes: Sequence[str] | None,
            checks: Sequence[str] | None = None) -> list[Target]:
    """Every (backend, op, dtype, check) to run, in a stable order."""
    out = []
    for b in backends:
        for op in ops:
            for dt in [d for d in DTYPES if d in b.dtypes and (not dtypes or d in dtypes)]:
                out += [Target(b.name, op, dt, c) for c in checks_of(op)
                        if not checks or c in checks]
    return out
