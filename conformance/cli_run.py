"""``lmspec run`` (CONTRACT §4): check the options, choose the backends, plan the run
(:class:`~lmspec.conformance.plan.RunPlan`), execute it (:mod:`~lmspec.conformance.runner`)
and write its report."""

from __future__ import annotations

import argparse
import fnmatch
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lmspec
from lmspec._precision import DTYPES
from lmspec.conformance.cli_common import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    backend_table,
    did_you_mean,
)
from lmspec.conformance.plan import PlannedBackend, RunPlan, Settings, checks_of, targets
from lmspec.conformance.record import CheckResult


def _select_ops(globs: Sequence[str]) -> list[str]:
    if not globs:
        return list(lmspec.OPS)
    ops: list[str] = []
    for g in globs:
        hit = [o for o in lmspec.OPS if fnmatch.fnmatchcase(o, g)]
        if not hit:
            raise UsageError(f"--op {g!r} matches no op{did_you_mean(g, list(lmspec.OPS))}; "
                             "the catalogue has: " + ", ".join(lmspec.OPS))
        ops += [o for o in hit if o not in ops]
    return [o for o in lmspec.OPS if o in ops]


def _select_backends(table: Any, names: Sequence[str]) -> list[Any]:
    """The entries to run: the ones named (each must be ok), else every available one
    (saying which were skipped and why)."""
    if not names:
        entries = table.check()
        for e in entries:
            if not e.ok:
                print(f"note: skipping backend {e.name}: {e.status}", file=sys.stderr)
        chosen = [e for e in entries if e.ok]
        if not chosen:
            raise UsageError("no backend is available; see `lmspec backends`")
        return chosen
    chosen = []
    for n in names:
        e = table.get(n)
        if e is None:
            names_known = [x.name for x in table.entries]
            raise UsageError(f"--backend {n!r} is not registered"
                             f"{did_you_mean(n, names_known)} (known: "
                             f"{', '.join(names_known) or 'none'})")
        table.check([e])
        if not e.ok:
            raise UsageError(f"backend {n!r} cannot run here: {e.status}")
        chosen.append(e)
    return chosen


CHECKS_PER_WORKER = 24
"""``--jobs N`` is an upper bound: a worker is started per this many checks at most,
since starting one (a pytest-xdist worker and its backend host) costs about as much as
running that many checks; so parallelism never makes a small run slower."""


def effective_jobs(asked: int, checks: int) -> int:
    return max(1, min(asked, checks // CHECKS_PER_WORKER))


def cmd_run(args: argparse.Namespace) -> int:
    from lmspec.conformance import runner

    # This process is the judge (the controller), also when it was started from inside a
    # pytest-xdist worker of some other test session: that session's worker variables
    # would make the run's own pytest plugin behave as a worker (and leave, on a signal,
    # without writing the report).
    for var in [k for k in os.environ if k.startswith("PYTEST_XDIST_")]:
        del os.environ[var]

    for d in args.dtype or ():
        if d not in DTYPES:
            raise UsageError(f"--dtype {d!r} is not one of {', '.join(DTYPES)}"
                             f"{did_you_mean(d, list(DTYPES))}")
    if args.max_examples is not None and args.max_examples < 1:
        raise UsageError("--max-examples must be at least 1")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    shard = None
    if args.shard:
        from lmspec.conformance.shards import parse_shard

        try:
            shard = parse_shard(args.shard)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if not args.timeout > 0:
        raise UsageError("--timeout must be a positive number of seconds")
    ops = _select_ops(args.op)
    known_checks = {c for op in ops for c in checks_of(op)}
    for c in args.check or ():
        if c not in known_checks:
            raise UsageError(f"--check {c!r} is not a check of the selected ops"
                             f"{did_you_mean(c, sorted(known_checks))} "
                             f"(known: {', '.join(sorted(known_checks))})")
    try:
        report_dir = runner.check_report_dir(args.report_dir)
    except OSError as exc:
        raise UsageError(f"cannot write reports to --report-dir {args.report_dir}: "
                         f"{exc.strerror or exc}") from None
    from lmspec.backends import sandbox

    try:
        sandbox.use(sandbox.resolve(args.sandbox, args.allow_network))
    except sandbox.SandboxUnavailable as exc:
        raise UsageError(f"--sandbox bwrap: {exc}") from None
    from lmspec.conformance import provenance

    provenance.preload()
    args.code_before = provenance.snapshot()  # compared before the report is written
    table = backend_table(args, args.backend)
    try:
        return _run(args, table, ops, report_dir, shard)
    finally:
        table.close()


def plan_run(args: argparse.Namespace, entries: Sequence[Any], ops: list[str],
             shard: tuple[int, int] | None) -> RunPlan:
    """The run ``args`` ask for on the backends of ``entries`` (loaded and available)."""
    everything = targets([e.backend() for e in entries], ops, args.dtype, args.check)
    if not everything:
        declared = "; ".join(f"{e.name}: {', '.join(e.dtypes) or 'none'}" for e in entries)
        raise UsageError(f"the selection is empty: no selected backend declares "
                         f"{', '.join(args.dtype or ['any dtype'])} (declared: {declared})")
    todo = everything
    if shard is not None:
        from lmspec.conformance.shards import shard as take_shard

        todo = take_shard(everything, *shard)
        if not todo:
            raise UsageError(f"shard {args.shard} of {len(everything)} checks is empty")
    replay: list[str] = []
    for e in entries:
        if e.source.kind in ("--plugin", "LMSPEC_PLUGINS"):
            replay += ["--plugin", e.source.target]
    from lmspec.backends.sandbox import current

    return RunPlan(
        backends=tuple(PlannedBackend(e.descriptor, (e.source.kind, e.source.target))
                       for e in entries),
        targets=tuple(todo),
        settings=Settings(args.profile, args.max_examples, args.seed, args.timeout,
                          tuple(replay), args.shapes),
        ops=tuple(ops),
        dtypes=tuple(args.dtype or sorted({t.dtype for t in everything},
                                          key=list(DTYPES).index)),
        checks=tuple(args.check) if args.check else None, plugins=tuple(args.plugin),
        sandbox=current().level, allow_network=current().allow_network,
        shard=args.shard if shard is not None else None)


def _run(args: argparse.Namespace, table: Any, ops: list[str], report_dir: Path,
         shard: tuple[int, int] | None = None) -> int:
    from lmspec.conformance import report, runner, terminal

    for e in table.entries:
        if e.status.startswith("failed to load"):
            print(f"warning: plugin {e.source.label}: {e.status}", file=sys.stderr)
    entries = _select_backends(table, args.backend)
    plan = plan_run(args, entries, ops, shard)
    todo, settings = plan.targets, plan.settings
    jobs = effective_jobs(args.jobs, len(todo))
    rows = [e.row() for e in entries]
    hosts = None
    if jobs == 1:  # this process is the judge: lend it the hosts already started
        hosts = {(e.source.kind, e.source.target): e.host for e in entries}
    else:  # the workers start their own: these exit while the workers start
        table.dismiss()
    print(f"lmspec {lmspec.__version__}: {terminal.plural(len(todo), 'check')} on "
          f"{', '.join(e.name for e in entries)} ({terminal.plural(len(ops), 'op')}; "
          f"profile {args.profile}, "
          + ("large shapes, " if args.shapes == "large" else "")
          + f"{settings.examples} examples per check, seed {args.seed}"
          + (f", shard {args.shard}" if shard else "")
          + (f"; {jobs} worker{'s' if jobs > 1 else ''}" if args.jobs > 1 else "") + ")",
          file=sys.stderr)
    journal = runner.Journal(report_dir, {"settings": plan.recorded(), "backends": rows,
                                          "targets": [t.id for t in todo]})
    progress = terminal.Progress(len(todo))

    def on_result(r: CheckResult) -> None:
        record = r.to_json()
        journal.write(record)
        progress(record)

    t0 = time.perf_counter()
    try:
        checked, stopped = runner.execute(plan, jobs, on_result, hosts)
    finally:
        progress.close()
    results = [r.to_json() for r in checked]
    gpu = next((r["info"].get("device_name") for r in rows
                if r["device"].startswith("cuda") and r.get("info")), None)
    rep = report.build(results, plan.recorded(), rows, time.perf_counter() - t0,
                       incomplete=stopped is not None, extra_env={"gpu": gpu})
    from lmspec.backends.sandbox import current
    from lmspec.conformance import provenance

    rep = provenance.stamp(rep, current().level, [e.source for e in entries])
    changed = current().level == "none" and provenance.changed_since(
        getattr(args, "code_before", {}))  # a sandboxed host cannot write them
    if changed:  # a backend may have planted code in the judge: nothing here is citable
        journal.close(remove=False)
        print(f"lmspec: error: {changed}; no report is written (docs/security.md: run "
              "untrusted backends with --sandbox bwrap)", file=sys.stderr)
        return EXIT_FAIL
    try:
        paths = report.write(rep, report_dir)
    except OSError as exc:
        journal.close(remove=False)
        print(f"lmspec: error: cannot write the report to {report_dir}: {exc}; the results are "
              f"kept in {journal.path}", file=sys.stderr)
        return EXIT_USAGE
    journal.close(remove=True)
    args.written = paths[0]
    terminal.summary(rep, results, list(paths))
    if stopped is not None:
        print(f"interrupted by {signal.Signals(stopped).name}: the report is marked incomplete",
              file=sys.stderr)
        return runner.EXIT_SIGNAL.get(stopped, 128 + int(stopped))
    return EXIT_FAIL if any(r["status"] in ("fail", "error") for r in results) else EXIT_OK
