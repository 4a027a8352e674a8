"""What a person sees on the terminal during and after a run."""

from __future__ import annotations

import sys
import time
from typing import Any

from tabulate import tabulate


class Progress:
    """Progress on stderr: a rewriting line on a terminal, a line per check otherwise."""

    def __init__(self, total: int, stream: Any = None):
        self.total = total
        self.done = 0
        self.bad = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, result: dict[str, Any]) -> None:
        self.done += 1
        self.bad += result["status"] in ("fail", "error")
        what = f"{result['backend']} {result['op']} {result['dtype']} {result['check']}"
        elapsed = time.perf_counter() - self.t0
        line = (f"[{self.done}/{self.total}] {elapsed:6.1f}s {result['status']:<11} {what}"
                + (f"  ({self.bad} failing)" if self.bad else ""))
        if self.tty:
            self.stream.write("\r\033[K" + line[:150])
            if result["status"] in ("fail", "error"):
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")



def summary(rep: dict[str, Any], results: list[dict[str, Any]], paths: list[Any]) -> None:
    """The end of a run on stdout: the table, each failure with its replay command, the
    counts and the files written."""
    from . import report

    headers, rows = report.comparison(results)
    print(tabulate(rows, headers))
    bad = [r for r in results if r["status"] in ("fail", "error")]
    for r in bad[:20]:
        print(f"\n{r['status'].upper()}: {r['backend']} {r['op']} {r['dtype']} {r['check']}: "
              f"{r['message'][:500]}")
        if r.get("reproduce"):
            print(f"  replay: {r['reproduce']}")
    s = rep["summary"]
    print("\n" + ", ".join(f"{v} {k}" for k, v in s.items()) + f" — report {rep['report_id']}")
    print("written: " + " and ".join(map(str, paths)))
