"""The four speed-and-scale figures of the conformance suite, in one run.

    .venv/bin/python benchmarks/bench_suite.py [--repeats N] [--skip-serial] [--skip-large]
        [--keep DIR]

1. the default profile on torch-cpu, all four dtypes, with ``--jobs 2`` (the median of
   ``--repeats`` runs, 3 by default: this machine's noise is ±10 %) and with
   ``--jobs 1`` (wall time and speed-up), and a 16-check selection both ways (best
   of five, alternately);
2. the reference against its matrix products at B=32, T=128, D=512
   (``benchmarks/bench_reference.py``, forward);
3. ``--shapes large`` for the attention, norm and cross-entropy ops with ``--jobs 2``;
4. the four shards of a quick run merged, against the unsharded run (results and
   ``report_id`` equal).

Every run goes through the ``lmspec`` command exactly as a user types it; the figures
are wall-clock seconds on this machine (say which when you quote them). Timing lives
here, never in assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LARGE_OPS = ["*attention*", "*norm*", "*softmax*", "logsumexp", "*cross_entropy*"]
SMALL_SELECTION = ["--op", "softmax"]  # 16 checks: forward, vjp, 2 properties × 4 dtypes
SMALL_REPEATS = 5  # the small selection is timed alternately, best of 5 each way


def lmspec(*args: str, keep: str | None = None) -> tuple[float, dict]:
    """Run ``lmspec run ARGS`` in a fresh report directory (or ``keep``): (seconds,
    report)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = keep or tmp
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "lmspec", "run", *args, "--report-dir", d],
                           capture_output=True, text=True)
        dt = time.perf_counter() - t0
        paths = sorted(Path(d).glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not paths:
            raise SystemExit(f"lmspec run {' '.join(args)} wrote no report:\n{r.stderr}")
        return dt, json.loads(paths[-1].read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-serial", action="store_true",
                    help="skip the (slow) --jobs 1 run of the whole default profile")
    ap.add_argument("--skip-large", action="store_true", help="skip the --shapes large run")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of the default profile with --jobs 2 (median; default 3)")
    ap.add_argument("--keep", metavar="DIR",
                    help="write the reports of the default --jobs 2 run to DIR (to commit)")
    args = ap.parse_args()
    rows: list[tuple[str, str]] = []

    def say(what: str, figure: str) -> None:
        rows.append((what, figure))
        print(f"{what}: {figure}", flush=True)

    full = ["--backend", "torch-cpu"]
    runs = [lmspec(*full, "--jobs", "2", keep=args.keep if k == 0 else None)
            for k in range(args.repeats)]
    times = sorted(t for t, _ in runs)
    t2, rep = statistics.median(times), runs[0][1]
    ids = {r["report_id"] for _, r in runs}
    say(f"default profile, torch-cpu, 4 dtypes, --jobs 2 (median of {args.repeats})",
        f"{t2:.1f} s (runs {', '.join(f'{t:.1f}' for t in times)}; "
        f"{len(rep['results'])} checks at {rep['settings']['max_examples']} examples, "
        f"{rep['summary']}; report_id {'the same in every run' if len(ids) == 1 else ids})")
    if not args.skip_serial:
        t1, _ = lmspec(*full, "--jobs", "1")
        say("  the same with --jobs 1", f"{t1:.1f} s (speed-up {t1 / t2:.2f}x)")
    small_runs: dict[str, list[float]] = {"2": [], "1": []}
    for k in range(SMALL_REPEATS):  # alternately, each first in turn
        for jobs in ("2", "1")[::1 if k % 2 == 0 else -1]:
            dt, small = lmspec("--backend", "torch-cpu", *SMALL_SELECTION, "--jobs", jobs)
            small_runs[jobs].append(dt)
    say(f"{len(small['results'])}-check selection (best of {SMALL_REPEATS})",
        f"--jobs 2 {min(small_runs['2']):.1f} s, --jobs 1 {min(small_runs['1']):.1f} s")

    ref = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_reference.py")),
                          "--no-vjp"], capture_output=True, text=True)
    say("reference / matmul floor (B=32, T=128, D=512)", "\n" + ref.stdout.strip())

    if not args.skip_large:
        tl, large = lmspec("--backend", "torch-cpu", "--shapes", "large", "--jobs", "2",
                           *[a for op in LARGE_OPS for a in ("--op", op)])
        say("--shapes large (attention, norm, cross-entropy ops), --jobs 2",
            f"{tl:.1f} s ({len(large['results'])} checks, {large['summary']})")

    quick = ["--backend", "torch-cpu", "--profile", "quick"]
    _, whole = lmspec(*quick)
    with tempfile.TemporaryDirectory() as d:
        for k in range(1, 5):
            subprocess.run([sys.executable, "-m", "lmspec", "run", *quick, "--shard", f"{k}/4",
                            "--report-dir", f"{d}/{k}"], capture_output=True, check=False)
        subprocess.run([sys.executable, "-m", "lmspec", "merge",
                        *map(str, Path(d).glob("[1-4]/*.json")), "-o", f"{d}/m"],
                       capture_output=True, check=False)
        merged = json.loads(next(Path(d, "m").glob("*.json")).read_text())
    same = merged["report_id"] == whole["report_id"]
    say("4 shards of the quick run merged", f"report_id {'equal' if same else 'DIFFERENT'} "
        f"({merged['report_id'][:19]}…), {len(merged['results'])} results")


if __name__ == "__main__":
    main()
