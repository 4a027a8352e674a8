"""What a person sees on the terminal during and after a run.

Progress goes to stderr: on a terminal one line rewritten in place (a bar, the running
counts, the ETA and the check in flight) with failures printed above it as they come;
otherwise one line per check. Checks an engine does not support are folded into one line
per (backend, op). The summary goes to stdout: the verdict table folded to the terminal's
width, every failure with its message, tolerance, shrunk counterexample and replay
command, the counts and the files written. Colour only on a terminal, and never when
``NO_COLOR`` is set (https://no-color.org).
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from . import tables

ANSI = {"pass": "32", "partial": "33", "deviation": "36", "fail": "31;1", "error": "31;1",
        "unsupported": "2", "skipped": "2"}
MAX_CELL = 28
"""Widest verdict cell of the summary table before it wraps."""


def use_colour(stream: Any) -> bool:
    """Colour when ``stream`` is a terminal, ``NO_COLOR`` is unset or empty and ``TERM``
    is not ``dumb``."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR") and os.environ.get(
        "TERM") != "dumb"


def paint(text: str, lab: str, colour: bool) -> str:
    code = ANSI.get(lab)
    return f"\033[{code}m{text}\033[0m" if colour and code else text


def plural(n: int, word: str) -> str:
    """``1 check``, ``2 checks``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def width(stream: Any = None) -> int:
    return max(40, shutil.get_terminal_size((100, 24)).columns)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{s}s"


class Progress:
    """Progress on stderr: a live bar on a terminal, a line per check otherwise."""

    def __init__(self, total: int, stream: Any = None):
        self.total = total
        self.done = 0
        self.counts: Counter[str] = Counter()
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", None) and self.stream.isatty())
        self.colour = use_colour(self.stream)
        self.t0 = time.perf_counter()
        self._folded: list[dict[str, Any]] = []

    def __call__(self, result: dict[str, Any]) -> None:
        self.done += 1
        lab = tables.label(result)
        self.counts[lab] += 1
        key = (result["backend"], result["op"])
        if self._folded and (self._folded[0]["backend"], self._folded[0]["op"]) != key:
            self._flush()
        if lab == "unsupported":
            self._folded.append(result)
        elif self.tty:
            if lab in ("fail", "error"):
                self._line(f"{paint(tables.MARK[lab], lab, self.colour)} {self._what(result)}: "
                           f"{tables.one_line(result['message'], 200)}")
        else:
            self._line(f"[{self.done}/{self.total}] {self._elapsed():>6} "
                       f"{paint(f'{tables.status_text(result):<11}', lab, self.colour)} "
                       f"{self._what(result)}")
        if self.tty:
            self._bar(result)
        self.stream.flush()

    @staticmethod
    def _what(r: dict[str, Any]) -> str:
        return f"{r['backend']} {r['op']} {r['dtype']} {r['check']}"

    def _elapsed(self) -> str:
        return f"{time.perf_counter() - self.t0:.1f}s"

    def _line(self, text: str) -> None:
        """A line that stays (above the bar on a terminal)."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")

    def _bar(self, current: dict[str, Any]) -> None:
        cols = width(self.stream) - 1
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        n = 20
        filled = n * self.done // max(1, self.total)
        bar = "█" * filled + "░" * (n - filled)
        counts = " ".join(paint(f"{v} {k}", k, self.colour) for k, v in sorted(
            self.counts.items(), key=lambda kv: tables.SEVERITY.index(kv[0])))
        plain = " ".join(f"{v} {k}" for k, v in self.counts.items())
        head = (f"{bar} {self.done}/{self.total} {100 * self.done // max(1, self.total):3d}% "
                f"{_clock(elapsed)} ETA {_clock(eta)} ")
        if len(head) + len(plain) > cols:  # a narrow terminal: the bar alone, never wrapped
            self.stream.write("\r\033[K" + head[:cols])
            return
        room = cols - len(head) - len(plain) - 3
        tail = f" | {self._what(current)[:room]}" if room > 10 else ""
        self.stream.write("\r\033[K" + head + counts + tail)

    def _flush(self) -> None:
        """One line for the unsupported checks of one (backend, op)."""
        rs, self._folded = self._folded, []
        if not rs:
            return
        by_dtype: dict[str, list[str]] = {}
        for r in rs:
            by_dtype.setdefault(r["dtype"], []).append(r["check"])
        which = "; ".join(f"{d} ({', '.join(c)})" for d, c in by_dtype.items())
        text = (f"{rs[0]['backend']} {rs[0]['op']}: {plural(len(rs), 'check')} unsupported: "
                f"{which} — {tables.one_line(rs[0]['message'], 120)}")
        prefix = "" if self.tty else f"[{self.done}/{self.total}] {self._elapsed():>6} "
        self._line(prefix + paint("unsupported", "unsupported", self.colour) + " " + text)

    def close(self) -> None:
        self._flush()
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


# -- the summary --------------------------------------------------------------------

def table(results: Sequence[dict[str, Any]], cols: int, colour: bool = False) -> str:
    """The op × backend × dtype table, its columns split into as many tables as the width
    ``cols`` needs (each repeating the op column) and long cells wrapped."""
    headers, rows = tables.comparison(results)
    if not rows:
        return "(no results)"
    g = tables.grid(results)
    keys = tables.columns(results)
    op_w = max(len(h) for h in [headers[0], *(r[0] for r in rows)])
    widths = [max(min(MAX_CELL, max(len(headers[j + 1]), *(len(r[j + 1]) for r in rows))),
                  *(len(w) for r in rows for w in r[j + 1].split()))  # no word is split
              for j in range(len(keys))]
    chunks: list[list[int]] = [[]]
    used = op_w
    for j, w in enumerate(widths):
        if chunks[-1] and used + 2 + w > cols:
            chunks.append([])
            used = op_w
        chunks[-1].append(j)
        used += 2 + w

    def fmt(i: int, j: int) -> str:
        text = rows[i][j + 1]
        lab = tables.worst_label(g.get((rows[i][0], *keys[j]), []))
        lines = textwrap.wrap(text, widths[j], break_long_words=False,
                              break_on_hyphens=False) or [""]
        return "\n".join(paint(x, lab, colour) for x in lines)

    out = []
    for chunk in chunks:
        out.append(tabulate([[rows[i][0]] + [fmt(i, j) for j in chunk] for i in range(len(rows))],
                            [headers[0]] + [headers[j + 1] for j in chunk],
                            disable_numparse=True))
    return "\n\n".join(out)


def failure_lines(r: dict[str, Any], cols: int = 100, colour: bool = False) -> list[str]:
    """A failure: its heading and message, the tolerance, the shrunk counterexample
    (arrays elided past 20 values) and the replay command."""
    lab = tables.label(r)
    out = [paint(f"{r['status'].upper()}: {r['backend']} {r['op']} {r['dtype']} {r['check']}",
                 lab, colour) + f": {tables.one_line(r['message'], 500)}"]
    tol = tables.tolerance_text(r)
    if tol:
        out.append(f"  tolerance {tol}; worst ratio {tables.num(r['worst_ratio'])}")
    ce = tables.counterexample_lines(r)
    if ce:
        out.append("  counterexample (shrunk):")
        out += [f"    {x}" if len(x) <= 3 * cols else f"    {x[:3 * cols - 1]}…" for x in ce]
    if r.get("reproduce"):
        out.append(f"  replay: {r['reproduce']}")
    return out


def summary(rep: dict[str, Any], results: list[dict[str, Any]], paths: Sequence[Any],
            stream: Any = None) -> None:
    """The end of a run on stdout: the table, each failure with its tolerance,
    counterexample and replay command, the counts and the files written."""
    out = stream or sys.stdout
    colour = use_colour(out)
    cols = width(out)
    print(table(results, cols, colour), file=out)
    bad = [r for r in results if r["status"] in ("fail", "error")]
    for r in bad[:20]:
        print("\n" + "\n".join(failure_lines(r, cols, colour)), file=out)
    if len(bad) > 20:
        print(f"\n… and {len(bad) - 20} more failures (see the report)", file=out)
    if rep.get("incomplete"):
        print("\n" + paint("incomplete: the run was stopped before every check finished",
                           "fail", colour), file=out)
    print(f"\n{tables.summary_text(rep)} — report {rep['report_id']}", file=out)
    print("written: " + ", ".join(map(str, paths)), file=out)
