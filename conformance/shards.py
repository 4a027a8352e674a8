"""Splitting one run across machines and merging the pieces into one citable report.

``lmspec run --shard K/N`` runs every N-th check of the selection, starting at the K-th,
in the run's stable order (backends, catalogue ops, dtypes, checks), so N jobs that any
scheduler starts (a CI matrix, a Slurm array, a Kubernetes indexed job) cover the
selection exactly once between them, each op and dtype spread over all of them.
``lmspec merge`` puts shard reports (and reports of other backends, e.g. from a CPU
box and a GPU box) together: the merged report's results and settings are those of the
unsharded run, so on the same environment it has the same ``report_id``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import lmspec
from lmspec._precision import DTYPES

from .harness import Target, checks_of

SHARD_RE = re.compile(r"([1-9][0-9]*)/([1-9][0-9]*)")


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` as ``(K, N)`` with ``1 ≤ K ≤ N`` (``ValueError`` otherwise)."""
    m = SHARD_RE.fullmatch(text.strip())
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"--shard must be K/N with 1 <= K <= N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard(todo: Sequence[Target], k: int, n: int) -> list[Target]:
    """The K-th of N interleaved shares of ``todo``."""
    return [t for i, t in enumerate(todo) if i % n == k - 1]


SHARED_SETTINGS = ("profile", "max_examples", "seed", "ops", "dtypes", "checks")


def _order(backends: Sequence[str]) -> Any:
    ops = list(lmspec.OPS)
    dts = list(DTYPES)

    def key(r: dict[str, Any]) -> tuple[int, int, int, int]:
        checks = checks_of(r["op"]) if r["op"] in lmspec.OPS else []
        return (backends.index(r["backend"]) if r["backend"] in backends else len(backends),
                ops.index(r["op"]) if r["op"] in ops else len(ops),
                dts.index(r["dtype"]) if r["dtype"] in dts else len(dts),
                checks.index(r["check"]) if r["check"] in checks else len(checks))

    return key


def merge(reports: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any],
                                                       list[dict[str, Any]], dict[str, Any]]:
    """``(results, settings, backends, environment)`` of the merged report.

    Every report must share the settings that decide the verdicts (profile, examples,
    seed, ops, dtypes, checks); a check present in two reports must agree. Raises
    ``ValueError`` naming the first conflict.
    """
    if not reports:
        raise ValueError("nothing to merge")
    first = reports[0]["settings"]
    for rep in reports[1:]:
        for key in SHARED_SETTINGS:
            if rep["settings"].get(key) != first.get(key):
                raise ValueError(f"reports differ in settings.{key}: {first.get(key)!r} and "
                                 f"{rep['settings'].get(key)!r}; they are not parts of one run")
    backends: list[str] = []
    rows: list[dict[str, Any]] = []
    plugins: list[str] = []
    for rep in reports:
        for name in rep["settings"].get("backends", []):
            if name not in backends:
                backends.append(name)
        for row in rep["backends"]:
            if row["name"] not in [r["name"] for r in rows]:
                rows.append(row)
        plugins += [p for p in rep["settings"].get("plugins", []) if p not in plugins]
    seen: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for rep in reports:
        for r in rep["results"]:
            key = (r["backend"], r["op"], r["dtype"], r["check"])
            if key in seen and seen[key]["status"] != r["status"]:
                raise ValueError(f"{' '.join(key)} is {seen[key]['status']} in one report and "
                                 f"{r['status']} in another")
            seen.setdefault(key, r)
    results = sorted(seen.values(), key=_order(backends))
    settings = {k: v for k, v in first.items() if k != "shard"}
    settings["backends"] = backends
    if "plugins" in first or plugins:
        settings["plugins"] = plugins
    envs = [rep["environment"] for rep in reports]
    environment = envs[0] if all(e == envs[0] for e in envs) else {"machines": _unique(envs)}
    return results, settings, rows, environment


def _unique(items: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for x in items:
        if x not in out:
            out.append(x)
    return out
