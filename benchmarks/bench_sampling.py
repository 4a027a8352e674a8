"""False-alarm rate and power of the statistical judge of samplers (sampling family).

    .venv/bin/python benchmarks/bench_sampling.py [--seeds N] [--mutant-seeds M]
        [--max-examples E] [--jobs J] [--json OUT] [--minutes T]

**False alarms.** torch-cpu's own samplers (``draw_tokens``: ``torch.multinomial`` with a
seeded ``torch.Generator``; ``draw_speculative``: vectorised chain rejection sampling)
run every statistical check of the family (``draws_fit``, ``draws_fit_target``,
``first_token_is_target``, ``accepted_count_closed_form``) through the real harness at
``--seeds`` different ``--seed`` values (seed ``s`` in dtype ``s mod 4``: float16,
bfloat16, float32, float64), ``--max-examples`` examples per check (the default profile's
30). Every check of a correct sampler should pass; the judge's stated bound is 10⁻⁶ per
check.

**Power.** Each sampler mutant of ``tests/test_mutants_sampling.py`` (a documented
alternative: top-p before temperature, top-k off by one, …) runs its check at
``--mutant-seeds`` seeds in float32; the figure is the share of runs that fail. The
harness also records, per check, the power the judge computed for each alternative in
each example (``statistics.alternatives``), summed here.

Shrinking is left on (it is part of a default run); only the verdicts are counted.
The mutants run first; the false-alarm seeds then run until ``--minutes`` have passed (if
given), and the figures count the seeds that finished. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, TimeoutError
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {"sampling_probs": ("draws_fit",),
          "speculative_accept": ("draws_fit_target", "first_token_is_target",
                                 "accepted_count_closed_form")}
DTYPES = ("float16", "bfloat16", "float32", "float64")


def _correct(seed: int, examples: int, only: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    from lmspec.backends.torch_backend import TorchBackend
    from lmspec.conformance.harness import Settings, Target, run_target

    backend = TorchBackend("torch-cpu", "cpu", DTYPES)
    dtype = DTYPES[seed % len(DTYPES)]
    out = []
    for op, checks in CHECKS.items():
        for check in [c for c in checks if not only or c in only]:
            t0 = time.perf_counter()
            r = run_target(backend, Target(backend.name, op, dtype, check),
                           Settings(max_examples=examples, seed=seed), backend.deviations)
            out.append({"seed": seed, "dtype": dtype, "op": op, "check": check,
                        "status": r["status"], "message": r["message"][:300],
                        "seconds": time.perf_counter() - t0,
                        "statistics": r.get("statistics")})
    return out


def _mutant(name: str, seed: int, examples: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.test_mutants_sampling import mutant_results

    t0 = time.perf_counter()
    results = mutant_results(name, seed, examples)
    return {"mutant": name, "seed": seed, "caught": all(r["status"] == "fail" for r in results),
            "statuses": [r["status"] for r in results], "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=1000)
    ap.add_argument("--mutant-seeds", type=int, default=20)
    ap.add_argument("--max-examples", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--check", action="append", default=[],
                    help="run only this statistical check on the correct samplers (repeatable)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.test_mutants_sampling import MUTANTS

    t0 = time.perf_counter()
    stop = t0 + 60 * args.minutes if args.minutes else float("inf")
    with ProcessPoolExecutor(args.jobs) as pool:
        jobs = [(m, s) for m in MUTANTS for s in range(args.mutant_seeds)]  # none with 0
        mutants = list(pool.map(_mutant, [m for m, _ in jobs], [s for _, s in jobs],
                                [args.max_examples] * len(jobs)))
        print(f"mutants done after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        correct: list[dict[str, Any]] = []
        futures = [pool.submit(_correct, s, args.max_examples, tuple(args.check))
                   for s in range(args.seeds)]
        for seed, fut in enumerate(futures):
            remaining = stop - time.perf_counter()
            if remaining <= 0:
                break
            try:
                correct += fut.result(timeout=remaining)
            except TimeoutError:
                break
            if seed % 10 == 9:
                print(f"{seed + 1} seeds after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for fut in futures:
            fut.cancel()
        seeds_done = len({r["seed"] for r in correct})
    fails = [r for r in correct if r["status"] != "pass"]
    print(f"correct samplers: {len(correct) - len(fails)} of {len(correct)} checks pass "
          f"({seeds_done} seeds × {len(correct) // max(seeds_done, 1)} checks, "
          f"{args.max_examples} examples each); non-passes:")
    for r in fails:
        print(f"  seed {r['seed']} {r['dtype']} {r['op']}/{r['check']}: {r['status']}: "
              f"{r['message']}")
    per_check: dict[str, list[float]] = {}
    power: dict[str, list[int]] = {}
    for r in correct:
        per_check.setdefault(r["check"], []).append(r["seconds"])
        for name, a in ((r["statistics"] or {}).get("alternatives") or {}).items():
            acc = power.setdefault(f"{r['check']}: {name}", [0, 0, 0])
            acc[0] += a["examples_with_power"]
            acc[1] += a["examples_differing"]
            acc[2] += a["examples_with_power"] > 0
    for check, secs in per_check.items():
        print(f"  {check}: mean {sum(secs) / len(secs):.2f} s per check")
    print("judge's computed power ≥ 0.99 (examples with it / examples where the alternative "
          "differs; checks with at least one such example):")
    for name, (good, diff, checks) in sorted(power.items()):
        print(f"  {name}: {good}/{diff} examples; {checks}/{seeds_done} checks")
    print(f"mutants ({args.mutant_seeds} seeds each, float32, {args.max_examples} examples):")
    for name in MUTANTS:
        runs = [m for m in mutants if m["mutant"] == name]
        caught = sum(m["caught"] for m in runs)
        secs = sum(m["seconds"] for m in runs) / max(len(runs), 1)
        print(f"  {name}: caught {caught}/{len(runs)} (mean {secs:.1f} s per run)")
    print(f"total {time.perf_counter() - t0:.0f} s with {args.jobs} jobs")
    if args.json:
        args.json.write_text(json.dumps({"correct": correct, "mutants": mutants}, indent=1))


if __name__ == "__main__":
    main()
