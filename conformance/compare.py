"""``lmspec compare``: several reports side by side, their differences marked.

The settings and environment of each report, then the verdicts op × dtype with a column
per report and backend. A row of the first table, or a cell of the second, that differs
between the reports is marked ``≠``; ``lmspec compare`` exits 1 when any verdict differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from .tables import (
    DIFF,
    compare_header,
    compare_results,
)


def compare_table(reports: Sequence[tuple[str, dict[str, Any]]], fmt: str = "simple"
                  ) -> tuple[str, int]:
    """``lmspec compare``: the reports' settings and environment side by side, then their
    verdicts, differences marked ``≠``; also the number of (op, dtype) whose verdicts
    differ (the command exits 1 when it is not 0)."""
    legend = [f"[{i + 1}] {name}: {rep['report_id']}" for i, (name, rep) in enumerate(reports)]
    hh, hrows = compare_header(reports)
    rh, rrows, differing = compare_results(reports)
    note = (f"{differing} (op, dtype) with differing verdicts (marked {DIFF})" if differing
            else "the verdicts agree on every (op, dtype) the reports share")
    if fmt == "github":
        legend = [f"- {x}" for x in legend]
    text = ("\n".join(legend) + "\n\n" + tabulate(hrows, hh, tablefmt=fmt) + "\n\n"
            + tabulate(rrows, rh, tablefmt=fmt) + f"\n\n{note}\n")
    return text, differing
