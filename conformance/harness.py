"""The conformance harness: the judge as a small library, in five public pieces.

- :mod:`~lmspec.conformance.plan`: profiles, targets and settings (what a run checks);
- :mod:`~lmspec.conformance.calls`: the guarded call (copies, deadlines, conversion);
- :mod:`~lmspec.conformance.judge`: the judge of one example (reference, baseline,
  comparison, claims, deviations);
- :mod:`~lmspec.conformance.record`: the record (statistics, :class:`CheckResult`);
- :mod:`~lmspec.conformance.search`: the search (the Hypothesis loop of one check).

This module gathers their public names for callers that want one import
(``from lmspec.conformance.harness import run_target, Settings, Target``).
"""

from __future__ import annotations

from .calls import (
    BackendError,
    CallTimeout,
    Fatal,
    Mismatch,
    Unsupported,
    Vjp,
    as_result,
    call_backend,
    map_arrays,
    named,
    op_kwargs,
    output,
    widen,
)
from .declare import CASES
from .judge import (
    ENGINE_MODES,
    STRICT,
    Gate,
    baseline,
    check_claims,
    compare_outputs,
    describe_deviation,
    deviation_for,
    deviation_key,
    perturbed_reference,
    reference,
)
from .plan import LARGE_PROFILES, PROFILES, Settings, Target, checks_of, targets
from .record import (
    MAX_COUNTEREXAMPLE_ELEMENTS,
    MIN_CHECKED_FRACTION,
    RATIO_EDGES,
    STATUSES,
    CheckResult,
    Stats,
    compact,
    jsonable,
    ratio_distribution,
)
from .search import (
    Drawer,
    StrategyError,
    check_drawn_dtypes,
    fresh_examples,
    reproduce_command,
    run_target,
    seed_of,
)

__all__ = [
    "CASES", "ENGINE_MODES", "LARGE_PROFILES", "MAX_COUNTEREXAMPLE_ELEMENTS",
    "MIN_CHECKED_FRACTION", "PROFILES", "RATIO_EDGES", "STATUSES", "STRICT", "BackendError",
    "CallTimeout", "CheckResult", "Drawer", "Fatal", "Gate", "Mismatch", "Settings", "Stats",
    "StrategyError", "Target", "Unsupported", "Vjp", "as_result", "baseline", "call_backend",
    "check_claims", "check_drawn_dtypes", "checks_of", "compact", "compare_outputs",
    "deviation_for", "deviation_key", "describe_deviation", "fresh_examples", "jsonable",
    "map_arrays", "named", "op_kwargs", "output", "perturbed_reference", "ratio_distribution",
    "reference", "reproduce_command", "run_target", "seed_of", "targets", "widen",
]
