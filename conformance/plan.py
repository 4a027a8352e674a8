"""What a run checks: profiles, targets and settings, from one source.

:data:`PROFILES` (and :data:`LARGE_PROFILES`) give the examples per check of each
``--profile``; :class:`Target` is one (backend, op, dtype, check); :class:`RunPlan` is
one run (backends, targets, settings, sandbox, shard); :func:`checks_of` and
:func:`targets` derive the checks from the catalogue (``lmspec.OPS``) and the families'
conformance declarations (``cases_*``), which importing this module loads. The CLI, the
pytest plugins, the API and the docs read these names.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class PlannedBackend:
    """A backend of a run: its descriptor (what its host said it is) and the plugin
    source its host loads (``(kind, target)``, e.g. ``("builtin", "lmspec")``)."""

    descriptor: dict[str, Any]
    source: tuple[str, str]

    @property
    def name(self) -> str:
        return str(self.descriptor["name"])


@dataclass(frozen=True)
class RunPlan:
    """One run, decided once (by ``lmspec run`` or a caller of the API) and read by every
    judge of it: the backends and their plugins, the targets in order, the search
    settings, the selection as asked for, the sandbox and the shard.

    ``lmspec run`` writes the plan to a private file (:meth:`write`) that each pytest-xdist
    worker reads (:meth:`read`); no worker rebuilds or filters targets. The report's
    ``settings`` are :meth:`recorded`.
    """

    backends: tuple[PlannedBackend, ...]
    targets: tuple[Target, ...]
    settings: Settings
    ops: tuple[str, ...]
    dtypes: tuple[str, ...]
    """The selection's dtypes: ``--dtype`` as asked, else every dtype the selected
    backends declare (before a shard takes its part)."""
    checks: tuple[str, ...] | None = None
    plugins: tuple[str, ...] = ()
    sandbox: str = "none"
    allow_network: bool = False
    shard: str | None = None

    def recorded(self) -> dict[str, Any]:
        """The report's ``settings`` (CONTRACT §5): what was asked for, as run."""
        out: dict[str, Any] = {
            "profile": self.settings.profile, "max_examples": self.settings.examples,
            "seed": self.settings.seed, "ops": list(self.ops),
            "dtypes": list(self.dtypes),
            "checks": list(self.checks) if self.checks else "all",
            "backends": [b.name for b in self.backends], "plugins": list(self.plugins)}
        if self.shard is not None:
            out["shard"] = self.shard
        if self.settings.shapes == "large":  # only then, so that other reports' ids stay
            out["shapes"] = self.settings.shapes
        return out

    def to_json(self) -> dict[str, Any]:
        s = self.settings
        return {
            "backends": [{"descriptor": b.descriptor, "source": list(b.source)}
                         for b in self.backends],
            "targets": [[t.backend, t.op, t.dtype, t.check] for t in self.targets],
            "settings": {"profile": s.profile, "max_examples": s.max_examples, "seed": s.seed,
                         "call_timeout_s": s.call_timeout_s,
                         "replay_args": list(s.replay_args), "shapes": s.shapes},
            "ops": list(self.ops), "dtypes": list(self.dtypes),
            "checks": None if self.checks is None else list(self.checks),
            "plugins": list(self.plugins), "sandbox": self.sandbox,
            "allow_network": self.allow_network, "shard": self.shard}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunPlan:
        s = data["settings"]
        return cls(
            backends=tuple(PlannedBackend(b["descriptor"], (b["source"][0], b["source"][1]))
                           for b in data["backends"]),
            targets=tuple(Target(*t) for t in data["targets"]),
            settings=Settings(s["profile"], s["max_examples"], int(s["seed"]),
                              float(s["call_timeout_s"]), tuple(s["replay_args"]),
                              s["shapes"]),
            ops=tuple(data["ops"]), dtypes=tuple(data["dtypes"]),
            checks=None if data["checks"] is None else tuple(data["checks"]),
            plugins=tuple(data["plugins"]), sandbox=data["sandbox"],
            allow_network=bool(data["allow_network"]), shard=data["shard"])

    def write(self, path: Path) -> None:
        """Write the plan as JSON (any size: an environment variable holds 128 KiB)."""
        path.write_text(json.dumps(self.to_json()), encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> RunPlan:
        with open(path, encoding="utf-8") as f:
            return cls.from_json(json.load(f))
