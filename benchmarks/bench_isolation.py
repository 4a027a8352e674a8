"""What process isolation costs: the same checks judged in-process and through a host,
and (``--sandbox-overhead``) a whole ``lmspec run`` with and without the sandbox.

    .venv/bin/python benchmarks/bench_isolation.py [--op GLOB ...] [--dtype D ...]
        [--max-examples N]
    .venv/bin/python benchmarks/bench_isolation.py --sandbox-overhead [--repeat N]
        [--jobs N] [--op GLOB ...]

The second form runs ``lmspec run --backend torch-cpu --jobs 2`` (the default run, or
the ops given) with ``--sandbox none`` and ``--sandbox bwrap`` in turn, ``--repeat``
times each, alternating so that a busy machine weighs on both, and prints the wall
times and the overhead of the sandbox (best of each).

Runs the selected checks of torch-cpu twice in one process, serially: once with the
backend object in the judge's process (as the project's tests do) and once with the
backend served by its host process (as ``lmspec run`` does), and prints both wall
times and the overhead. The examples, the reference and the verdicts are the same; the
difference is the price of the pickle protocol, the copies and the input checks.
Timing lives here, never in assertions.
"""

from __future__ import annotations

import argparse
import fnmatch
import statistics
import subprocess
import sys
import tempfile
import time

import lmspec
from lmspec.backends.discovery import BackendTable
from lmspec.backends.torch_backend import TorchBackend
from lmspec.conformance.harness import Settings, run_target, targets


def sandbox_overhead(ops: list[str] | None, jobs: int, repeat: int) -> None:
    """Wall time of one ``lmspec run`` of torch-cpu per sandbox level, alternating."""
    times: dict[str, list[float]] = {"none": [], "bwrap": []}
    for _ in range(repeat):
        for level in times:
            with tempfile.TemporaryDirectory() as d:
                cmd = [sys.executable, "-m", "lmspec", "run", "--backend", "torch-cpu",
                       "--jobs", str(jobs), "--sandbox", level, "--report-dir", d]
                cmd += [a for o in ops or () for a in ("--op", o)]
                t0 = time.perf_counter()
                r = subprocess.run(cmd, capture_output=True, text=True)
                times[level].append(time.perf_counter() - t0)
                tail = r.stdout.strip().splitlines()[-2:-1] or r.stderr.strip().splitlines()[-1:]
                print(f"  --sandbox {level:<6} {times[level][-1]:7.1f} s  {tail[0][:70]}")
                done = " error," in tail[0] or "files changed during the run" in tail[0]
                if r.returncode not in (0, 1) or not done:  # (a refused report ran every check)
                    raise SystemExit(f"--sandbox {level}: exit {r.returncode}\n{r.stderr[-2000:]}")
    for level, ts in times.items():
        print(f"  --sandbox {level:<6} " + "  ".join(f"{t:6.1f} s" for t in ts))
    for what, pick in (("best", min), ("median", statistics.median)):
        b, n = pick(times["bwrap"]), pick(times["none"])
        print(f"  sandbox overhead {100 * (b / n - 1):+6.1f} % ({what} of {repeat})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", action="append", default=None)
    ap.add_argument("--dtype", action="append", default=None)
    ap.add_argument("--max-examples", type=int, default=None)
    ap.add_argument("--sandbox-overhead", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    if args.sandbox_overhead:
        sandbox_overhead(args.op, args.jobs, args.repeat)
        return
    ops = [o for o in lmspec.OPS if not args.op or any(fnmatch.fnmatch(o, g) for g in args.op)]
    settings = Settings(max_examples=args.max_examples)
    local = TorchBackend("torch-cpu", "cpu", ("float16", "bfloat16", "float32", "float64"))
    table = BackendTable.default(only_builtin=True)
    remote = table.get("torch-cpu").backend()
    remote.softmax(__import__("numpy").zeros(2))  # start the host before timing
    todo = targets([local], ops, args.dtype)
    times = {}
    statuses = {}
    for label, backend in (("in-process", local), ("host process", remote)):
        t0 = time.perf_counter()
        statuses[label] = [run_target(backend, t, settings, dict(backend.deviations))["status"]
                           for t in todo]
        times[label] = time.perf_counter() - t0
    table.close()
    same = statuses["in-process"] == statuses["host process"]
    print(f"{len(todo)} checks ({len(ops)} ops), {settings.examples} examples each")
    for label, t in times.items():
        print(f"  {label:<13} {t:8.1f} s")
    print(f"  overhead      {100 * (times['host process'] / times['in-process'] - 1):+7.1f} %"
          f"   (verdicts {'identical' if same else 'DIFFER'})")


if __name__ == "__main__":
    main()
