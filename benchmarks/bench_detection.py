"""How many fresh examples the suite needs to catch each mutant of the test suite.

    .venv/bin/python benchmarks/bench_detection.py [--seeds N] [--max-examples N] [--jobs N]
        [--every-check] [--copies] [--family F]...

Every mutant of ``tests/test_mutants_*.py`` (the one-line bugs a kernel author makes:
a swapped gate, a missing max shift, a wrong scale, a mask off by one, …) runs through
the real harness on the checks and dtypes its test names, with ``--seeds`` different
``--seed`` values and up to ``--max-examples`` examples per check. For each (mutant,
seed) the figure is the number of examples drawn up to and including the first one the
harness fails (the ``examples`` of a failing result; shrinking is switched off, since it
only rewrites that example), the smallest over the mutant's checks.

The table answers "would a profile of N examples per check have caught it?": the share
of (mutant, seed) runs whose first failure came within N examples. The examples a run
begins with depend on how many it may draw (measured: within their first 30 examples,
100-example runs caught 316 of 325, 30-example runs 322), so only the row of
``--max-examples`` itself is exact, and each count worth quoting is run on its own.

The half-precision mutants of ``tests/test_mutants_half.py`` (rounding in the wrong place)
run in the half dtypes they target, on a backend that declares all four dtypes; their
figure is the first failing example over those dtypes and checks. ``--family`` keeps the
mutants of the named test files only (``core``, ``half``, …; repeatable).

``--every-check`` runs every check of the op in float32 and float64 (and the test's
dtype), as a default run has them, with torch-cpu's declared deviations;
``--copies`` leaves Hypothesis' span-copying mutator on, as it was
before every example was a fresh draw.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MILESTONES = (5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100)
Mutant = tuple[str, str, Callable[..., Any], tuple[str, ...], tuple[str, ...] | None]
FAMILIES = ("core", "attention", "modern", "recurrent", "training", "ngram", "half")
HALF = ("float16", "bfloat16")


def mutants(families: tuple[str, ...] = FAMILIES) -> Iterator[Mutant]:
    """(name, op, torch function, dtypes, checks) of every mutant of the test files
    ``tests/test_mutants_<family>.py``, as its test runs it."""
    sys.path.insert(0, str(ROOT))
    mod = {f: importlib.import_module(f"tests.test_mutants_{f}") for f in families}
    if "core" in mod:
        for name, (op, fn) in mod["core"].MUTANTS.items():
            yield name, op, fn, ("float32",), None
    if "attention" in mod:
        for name, (op, fn) in mod["attention"].MUTANTS.items():
            yield name, op, fn, ("float64",), ("forward",)
    if "modern" in mod:
        for name, (op, fn, check, dtype) in mod["modern"].MUTANTS.items():
            yield name, op, fn, (dtype,), (check,)
    if "recurrent" in mod:
        for op, fn, checks in mod["recurrent"].MUTANTS:
            yield fn.__name__, op, fn, ("float64",), checks
    if "training" in mod:
        for name, (op, fn, checks) in mod["training"].MUTANTS.items():
            yield name, op, fn, ("float32",), checks
    if "ngram" in mod:
        for name, cls in mod["ngram"].MUTANTS.items():
            for dt in ("float32", "float64"):
                yield f"{name} ({dt})", "ngram_log_prob", cls.log_prob, (dt,), None
    if "half" in mod:
        for name, (op, fn, dtypes, checks) in mod["half"].MUTANTS.items():
            yield f"half: {name}", op, fn, dtypes, checks


def first_failure(index: int, seed: int, max_examples: int, copies: bool = False,
                  every_check: bool = False,
                  families: tuple[str, ...] = FAMILIES) -> tuple[int, int, int | None]:
    """(mutant index, seed, examples up to the first failing one, or None if never);
    ``copies``: with Hypothesis' span-copying mutations left on (see
    ``search.fresh_examples``), as every check ran before examples were all fresh;
    ``every_check``: every check of the op in float32 and float64 (and the test's
    dtype), as a default run has them, with torch-cpu's declared deviations kept (an
    example they cover is not a catch)."""
    from contextlib import nullcontext
    from functools import cached_property

    from hypothesis import Phase

    from lmspec.conformance import search as harness  # the module whose names run_target uses

    # the measured figure is the index of the first failing example; a shrink would only
    # rewrite that example, so it is skipped (Phase.generate stands in for it)
    harness.Phase = SimpleNamespace(explicit=Phase.explicit, reuse=Phase.reuse,
                                    generate=Phase.generate, shrink=Phase.generate)
    if copies:
        harness.fresh_examples = nullcontext
    sys.path.insert(0, str(ROOT))
    from lmspec.backends.torch_backend import TorchBackend
    from tests.conftest import MutantBackend, run_checks

    class Declared(MutantBackend):
        @cached_property
        def deviations(self) -> dict[str, str]:  # type: ignore[override]
            return TorchBackend.deviations.func(self)

    name, op, fn, dtypes, checks = list(mutants(families))[index]
    backend = MutantBackend({op: fn})
    if every_check:
        backend, checks = Declared({op: fn}), None
        dtypes = tuple(dict.fromkeys((*dtypes, "float32", "float64")))
    if set(dtypes) & set(HALF):  # a backend that declares the half dtypes too
        backend.dtypes = (*HALF, "float32", "float64")
    results = run_checks(backend, op, dtypes, checks, max_examples, seed)
    caught = [r["examples"] for r in results if r["status"] == "fail"]
    return index, seed, min(caught) if caught else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds per mutant (default 5)")
    ap.add_argument("--max-examples", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--copies", action="store_true",
                    help="leave Hypothesis' span-copying mutations on (the search before "
                         "every example was a fresh draw)")
    ap.add_argument("--every-check", action="store_true",
                    help="every check of the mutated op in float32 and float64, as a "
                         "default run has them (not only the checks its test names)")
    ap.add_argument("--family", action="append", choices=FAMILIES,
                    help="only the mutants of tests/test_mutants_<family>.py (repeatable; "
                         "default: every family)")
    args = ap.parse_args()
    families = tuple(args.family or FAMILIES)
    names = [m[0] for m in mutants(families)]
    t0 = time.perf_counter()
    found: dict[int, list[int | None]] = {i: [] for i in range(len(names))}
    with ProcessPoolExecutor(args.jobs) as pool:
        futs = [pool.submit(first_failure, i, s, args.max_examples, args.copies,
                            args.every_check, families)
                for i in range(len(names)) for s in range(args.seeds)]
        for k, f in enumerate(futs, 1):
            i, _, n = f.result()
            found[i].append(n)
            print(f"\r{k}/{len(futs)} runs", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    width = max(map(len, names))
    print(f"{'mutant':<{width}}  first failing example, seeds 0..{args.seeds - 1}")
    for i, name in enumerate(names):
        print(f"{name:<{width}}  " + " ".join(
            f"{n:>3}" if n is not None else "  -" for n in found[i]))
    runs = [n for v in found.values() for n in v]
    print(f"\n{len(names)} mutants × {args.seeds} seeds = {len(runs)} runs, "
          f"{time.perf_counter() - t0:.0f} s")
    print("examples per check N | runs caught within N | mutants caught on every seed")
    for m in (x for x in MILESTONES if x <= args.max_examples):
        within = sum(n is not None and n <= m for n in runs)
        every = sum(all(n is not None and n <= m for n in v) for v in found.values())
        print(f"{m:>20} | {within:>4}/{len(runs)} ({100 * within / len(runs):5.1f} %) | "
              f"{every}/{len(names)}")


if __name__ == "__main__":
    main()
