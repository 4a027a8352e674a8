"""Profiles and dtypes, the one source the CLI, the pytest plugins, the API and the docs
read (cheap to import: no Hypothesis, no declarations)."""

from __future__ import annotations

from lmspec._precision import DTYPES

DTYPE_NAMES: tuple[str, ...] = tuple(DTYPES)
"""The contract's float dtypes (CONTRACT §1), in report order."""

PROFILES: dict[str, int] = {"quick": 20, "default": 30, "thorough": 1000}
"""Fresh examples per check of each ``--profile``. The default's 30 come from
``benchmarks/bench_detection.py``: over the 65 mutants of the test suite on 5 seeds each,
a run of 30 examples per check caught 322 of 325 (mutant, seed) runs on the mutant's own
checks (323 on every check of its op in float32 and float64), 100 examples 324 (325),
and the former default (100 examples, about 70 of them Hypothesis' copies of parts of
earlier ones) 309."""


LARGE_PROFILES: dict[str, int] = {"quick": 3, "default": 5, "thorough": 50}
"""Examples per check of the large-shape tier (``--shapes large``): each costs hundreds
of small ones, and its sizes already sit at the tile boundaries a search would seek."""


def profile_help(large: bool = False) -> str:
    """``"examples per check: quick 20, default 30, thorough 1000"`` for help texts."""
    table = LARGE_PROFILES if large else PROFILES
    return "examples per check: " + ", ".join(f"{k} {v}" for k, v in table.items())
