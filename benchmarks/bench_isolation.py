"""What process isolation costs: the same checks judged in-process and through a host.

    .venv/bin/python benchmarks/bench_isolation.py [--op GLOB ...] [--dtype D ...]
        [--max-examples N]

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
import time

import lmspec
from lmspec.backends.discovery import BackendTable
from lmspec.backends.torch_backend import TorchBackend
from lmspec.conformance.harness import Settings, run_target, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", action="append", default=None)
    ap.add_argument("--dtype", action="append", default=None)
    ap.add_argument("--max-examples", type=int, default=None)
    args = ap.parse_args()
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
