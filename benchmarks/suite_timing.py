"""Where a conformance run spends its time, from the report it wrote.

    .venv/bin/python benchmarks/suite_timing.py reports/<run-id>.json [--top 15]

Prints the wall time per family and per check kind, and the slowest checks (each
result records its own ``duration_s``). Timing lives here and in reports, never in
assertions.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from tabulate import tabulate

import lmspec
from lmspec.conformance.report import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    rep = load(args.report)
    results = rep["results"]
    by_family: dict[str, float] = defaultdict(float)
    by_check: dict[str, float] = defaultdict(float)
    for r in results:
        fam = lmspec.OPS[r["op"]].family if r["op"] in lmspec.OPS else "?"
        by_family[fam] += r.get("duration_s", 0.0)
        kind = r["check"] if r["check"] in ("forward", "vjp") else "properties"
        by_check[kind] += r.get("duration_s", 0.0)
    s = rep["settings"]
    print(f"{rep['report_id']}: {len(results)} checks, {rep['duration_s']} s wall "
          f"(profile {s['profile']}, {s['max_examples']} examples per check)\n")
    print(tabulate(sorted(by_family.items(), key=lambda kv: -kv[1]), ["family", "seconds"],
                   floatfmt=".1f"), "\n")
    print(tabulate(sorted(by_check.items(), key=lambda kv: -kv[1]), ["check", "seconds"],
                   floatfmt=".1f"), "\n")
    slow = sorted(results, key=lambda r: -r.get("duration_s", 0.0))[: args.top]
    print(tabulate([[r["backend"], r["op"], r["dtype"], r["check"], r["examples"],
                     r.get("duration_s", 0.0)] for r in slow],
                   ["backend", "op", "dtype", "check", "examples", "seconds"], floatfmt=".2f"))


if __name__ == "__main__":
    main()
