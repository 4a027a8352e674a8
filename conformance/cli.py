"""The ``lmspec`` command line (CONTRACT §4): backends, ops, run, compare."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

import lmspec
from lmspec.conformance.cli_common import (
    EXIT_BROKEN_PIPE,
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    backend_table,
)
from lmspec.conformance.cli_run import CHECKS_PER_WORKER, cmd_run
from lmspec.conformance.profiles import DTYPE_NAMES, PROFILES, profile_help

# -- lmspec backends -------------------------------------------------------------------

def cmd_backends(args: argparse.Namespace) -> int:
    table = backend_table(args)
    try:
        rows = [e.row() for e in table.check()]
    finally:
        table.close()
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return EXIT_OK
    print(tabulate([[r["name"], r["device"], ", ".join(r["dtypes"]), r["plugin"], r["status"]]
                    for r in rows], ["backend", "device", "dtypes", "plugin", "status"]))
    return EXIT_OK


# -- lmspec ops --------------------------------------------------------------------

def cmd_ops(args: argparse.Namespace) -> int:
    from lmspec.conformance.harness import checks_of

    table = backend_table(args)
    table.close()
    entries = [e for e in table.entries if e.loaded]
    rows = []
    for name, d in lmspec.OPS.items():
        rows.append({"op": name, "family": d.family, "diff": list(d.diff),
                     "checks": checks_of(name),
                     "backends": [e.name for e in entries
                                  if name in e.descriptor.get("implements", ())],
                     "summary": d.summary})
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    if args.markdown:
        print(catalogue_markdown(), end="")
        return EXIT_OK
    print(tabulate([[r["op"], r["family"], ", ".join(r["diff"]) or "-",
                     ", ".join(r["backends"]) or "-"] for r in rows],
                   ["op", "family", "differentiable in", "implemented by"]))
    return EXIT_OK


def catalogue_markdown() -> str:
    """The catalogue as a Markdown table (docs/catalogue.md shows this output)."""
    import inspect

    from lmspec.conformance.harness import checks_of

    rows = [[f"`{name}`", d.family, f"`{name}{inspect.signature(d.reference)}`",
             ", ".join(f"`{a}`" for a in d.diff) or "—",
             ", ".join(c for c in checks_of(name) if c not in ("forward", "vjp")) or "—"]
            for name, d in lmspec.OPS.items()]
    return tabulate(rows, ["op", "family", "signature", "differentiable in", "properties"],
                    tablefmt="github") + "\n"


# -- lmspec verify / replay ---------------------------------------------------------

def cmd_verify(args: argparse.Namespace) -> int:
    from lmspec.conformance import citation, provenance, report

    ok, lines = True, []
    for path in args.reports:  # the id, then what a rehashed report cannot hide
        try:
            problems = provenance.consistency(report.load(path))
        except (OSError, ValueError):
            problems = []
        good, line = (False, f"{path}: inconsistent — " + "; ".join(problems)) if problems \
            else citation.verify(path)
        ok, lines = ok and good, [*lines, line]
    print("\n".join(lines))
    return EXIT_OK if ok else EXIT_FAIL


def cmd_replay(args: argparse.Namespace) -> int:
    import tempfile

    from lmspec.conformance import citation, report

    try:
        old = report.load(args.report)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read report {args.report}: {exc}") from exc
    ok, line = citation.verify(args.report)
    print(line, file=sys.stderr)
    out_dir = args.report_dir or tempfile.mkdtemp(prefix="lmspec-replay-")
    run_args = parser().parse_args(citation.replay_args(old, out_dir) + ["--jobs",
                                                                        str(args.jobs)])
    code = cmd_run(run_args)
    if not hasattr(run_args, "written") or code > 128:  # 130/143: the replay was stopped
        return code
    diff = citation.differences(old, report.load(run_args.written))
    if diff:
        print(f"\n{len(diff)} verdict(s) differ from {args.report}:")
        print("\n".join(diff))
        return EXIT_FAIL
    print(f"\nevery verdict of {args.report} holds here ({len(old['results'])} checks)")
    return EXIT_OK if ok else EXIT_FAIL


def cmd_merge(args: argparse.Namespace) -> int:
    from lmspec.conformance import report, shards

    reps = []
    for p in args.reports:
        try:
            reps.append(report.load(p))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read report {p}: {exc}") from exc
    try:
        results, settings, rows, env = shards.merge(reps)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    rep = report.build(results, settings, rows, sum(r.get("duration_s", 0.0) for r in reps),
                       incomplete=any(r.get("incomplete") for r in reps))
    rep["environment"] = env
    rep["report_id"] = report.report_id(rep)
    try:
        paths = report.write(rep, args.output)
    except OSError as exc:
        raise UsageError(f"cannot write to {args.output}: {exc}") from None
    s = rep["summary"]
    print(", ".join(f"{v} {k}" for k, v in s.items()) + f" — report {rep['report_id']}")
    print("written: " + " and ".join(map(str, paths)))
    return EXIT_FAIL if s["fail"] or s["error"] else EXIT_OK


# -- lmspec compare ----------------------------------------------------------------

def cmd_compare(args: argparse.Namespace) -> int:
    from lmspec.conformance import compare, report

    reps = []
    for p in args.reports:
        try:
            reps.append((p, report.load(p)))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read report {p}: {exc}") from exc
    text, differing = compare.compare_table(reps, "github" if args.markdown else "simple")
    print(text, end="")
    if args.html:
        from pathlib import Path

        from lmspec.conformance import html

        report._atomic_write(Path(args.html), html.render_compare(reps))
        print(f"written: {args.html}", file=sys.stderr)
    return EXIT_FAIL if differing else EXIT_OK


# -- lmspec report -----------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    from lmspec.conformance import report

    if (args.report is None) == (args.journal is None):
        raise UsageError("give either REPORT.json or --journal FILE")
    both = not (args.html or args.markdown)
    try:
        if args.journal:
            from pathlib import Path

            rep = report.from_journal(args.journal)
            paths = report.write(rep, args.output or Path(args.journal).parent)
        else:
            paths = report.regenerate(args.report, args.output, html=args.html or both,
                                      md=args.markdown or both)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot write a report from {args.report or args.journal}: "
                         f"{exc}") from exc
    print("written: " + ", ".join(map(str, paths)))
    return EXIT_OK


# -- entry point -------------------------------------------------------------------

EXIT_CODES = """exit status:
  0    everything conforms (documented deviations allowed)
  1    at least one check is fail or error (compare/replay: verdicts differ;
       verify: a report is edited)
  2    bad usage or configuration (unknown backend, op, dtype, check; an unusable
       --report-dir; a backend that cannot run here)
  130  stopped by SIGINT, 143 by SIGTERM (the report is written, marked incomplete)
  141  the reader of the output went away (a closed pipe)"""

_STOPPED = """
  130  stopped by SIGINT, 143 by SIGTERM
  141  the reader of the output went away (a closed pipe)"""
EXITS = {
    "backends": """exit status:
  0    the list was printed, whatever each backend's status
  2    bad usage""" + _STOPPED,
    "ops": """exit status:
  0    the catalogue was printed
  2    bad usage""" + _STOPPED,
    "run": EXIT_CODES.replace("""
  1    at least one check is fail or error (compare/replay: verdicts differ;
       verify: a report is edited)""", """
  1    at least one check is fail or error"""),
    "verify": """exit status:
  0    every report is intact
  1    a report is edited, inconsistent or unreadable
  2    bad usage""",
    "replay": """exit status:
  0    every verdict of the report holds here, and the report is intact
  1    a verdict differs here, or the report is edited
  2    bad usage or configuration (an unreadable report; its backend cannot run here)
  130  stopped by SIGINT, 143 by SIGTERM""",
    "merge": """exit status:
  0    the merged report has no fail and no error
  1    the merged report has a fail or an error
  2    bad usage (an unreadable report, reports that cannot be merged, an unwritable DIR)""",
    "compare": """exit status:
  0    the reports' verdicts agree
  1    a verdict differs
  2    bad usage (an unreadable report)""",
    "report": """exit status:
  0    the pages were written
  2    bad usage (neither or both of REPORT.json and --journal; an unreadable report
       or journal; an unwritable DIR)""",
    "vectors": """exit status:
  0    export: the vectors were written; check: every output conforms
  1    check: an output fails or errs
  2    bad usage""",
}
"""Each subcommand's exit statuses, shown by its --help."""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Help with each option's default (where it has a meaningful one) and the exit
    codes kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not (default is None or default is False or default == []
                or default is argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def parser() -> argparse.ArgumentParser:
    fmt = _Help
    p = argparse.ArgumentParser(prog="lmspec", description=lmspec.__doc__.split("\n\n")[0],
                                epilog=EXIT_CODES, formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"lmspec {lmspec.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str = "",
                **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, formatter_class=fmt, epilog=EXITS[name],
                              description=description or help[0].upper() + help[1:] + ".",
                              **kw)

    def plugin_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--plugin", action="append", default=[], metavar="MOD",
                        help="also load this plugin module (repeatable); it must be importable "
                             "by the backend process, e.g. with PYTHONPATH=.")

    def timeout_opt(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help=what)

    b = command("backends", "list every backend and its status")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    timeout_opt(b, "limit on loading a plugin and on its available()")
    plugin_opt(b)
    b.set_defaults(func=cmd_backends)

    o = command("ops", "list the op catalogue")
    o.add_argument("--json", action="store_true", help="machine-readable output")
    o.add_argument("--markdown", action="store_true", help="the catalogue as a Markdown table")
    plugin_opt(o)
    o.set_defaults(func=cmd_ops)

    r = command("run", "run the conformance suite and write a report")
    r.add_argument("--backend", action="append", default=[], metavar="NAME",
                   help="backend to check (repeatable; default: every available backend)")
    r.add_argument("--op", action="append", default=[], metavar="GLOB",
                   help="ops to check, shell-style patterns (repeatable; default: all)")
    r.add_argument("--dtype", action="append", default=None, metavar="D",
                   help=f"{', '.join(DTYPE_NAMES[:-1])} or {DTYPE_NAMES[-1]} (repeatable; "
                        "default: every dtype each backend declares)")
    r.add_argument("--check", action="append", default=None, metavar="CHECK",
                   help="only this check: forward, vjp or a property name (repeatable)")
    r.add_argument("--profile", choices=list(PROFILES), default="default",
                   help=profile_help())
    r.add_argument("--max-examples", type=int, default=None, metavar="N",
                   help="examples per check, overriding the profile")
    r.add_argument("--seed", type=int, default=0, help="seed of the example search")
    r.add_argument("--shapes", choices=["small", "large"], default="small",
                   help="large: lengths and widths that straddle kernel tile sizes (attention, "
                        "norm and cross-entropy ops), a few examples each")
    r.add_argument("--report-dir", default="reports", metavar="DIR",
                   help="where the .json, .md and .html reports go (created if missing)")
    r.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="at most N parallel workers (pytest-xdist); lmspec starts one per "
                        f"{CHECKS_PER_WORKER} checks at most, so a small run stays serial")
    r.add_argument("--shard", default=None, metavar="K/N",
                   help="run only the K-th of N interleaved shares of the checks; "
                        "`lmspec merge` combines the shard reports")
    timeout_opt(r, "limit on one backend call; a call that overstays has its backend process "
                   "killed and the check becomes an error")
    r.add_argument("--sandbox", choices=["auto", "bwrap", "none"], default="auto",
                   help="how backend hosts are isolated: bwrap (bubblewrap: read-only files, "
                        "own PID and network namespace), none, or auto (bwrap where it works "
                        "here, else none with a warning); see docs/security.md")
    r.add_argument("--allow-network", action="store_true",
                   help="let sandboxed backend hosts use the network")
    plugin_opt(r)
    r.set_defaults(func=cmd_run)

    v = command("verify", "recompute each report's id: intact or edited")
    v.add_argument("reports", nargs="+", metavar="REPORT.json")
    v.set_defaults(func=cmd_verify)

    rp = command("replay", "rerun a report's selection and settings here and show where "
                           "the verdicts differ")
    rp.add_argument("report", metavar="REPORT.json")
    rp.add_argument("--report-dir", default=None, metavar="DIR",
                    help="where the new report goes (default: a temporary directory)")
    rp.add_argument("--jobs", type=int, default=1, metavar="N", help="as for run")
    rp.set_defaults(func=cmd_replay)

    m = command("merge", "combine shard reports (or reports of different backends) into one")
    m.add_argument("reports", nargs="+", metavar="REPORT.json")
    m.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="directory for the merged report")
    m.set_defaults(func=cmd_merge)

    c = command("compare", "one side-by-side table of several reports",
                "Show several reports side by side: their lmspec version, profile, seed, "
                "examples per check and environment, then their verdicts per op and dtype; "
                "anything that differs is marked ≠.")
    c.add_argument("reports", nargs="+", metavar="REPORT.json")
    c.add_argument("--markdown", action="store_true", help="the tables in Markdown")
    c.add_argument("--html", metavar="FILE", help="also write the comparison as HTML to FILE")
    c.set_defaults(func=cmd_compare)

    g = command("report", "write a JSON report's HTML and Markdown again",
                "Write a JSON report's HTML and Markdown pages again, or (--journal) the "
                "whole report of a run whose controller died, from its journal.")
    g.add_argument("report", metavar="REPORT.json", nargs="?")
    g.add_argument("--journal", metavar="FILE",
                   help="instead, write the report (JSON, Markdown, HTML) of a run whose "
                        "controller died from the journal it left in its report directory")
    g.add_argument("--html", action="store_true", help="only the HTML")
    g.add_argument("--markdown", action="store_true", help="only the Markdown")
    g.add_argument("-o", "--output", metavar="DIR",
                   help="where to write them (default: beside REPORT.json)")
    g.set_defaults(func=cmd_report)

    from lmspec.conformance.vectors import configure_parser  # light: stdlib and NumPy

    configure_parser(command("vectors", "golden vectors: export inputs and references; judge "
                             "outputs computed elsewhere",
                             "Golden vectors for implementations outside Python: `export` "
                             "writes inputs, float64 references and tolerance data; `check` "
                             "judges outputs computed elsewhere and writes a report."))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    from lmspec.backends import guard

    if argv is None and args.command in ("run", "replay", "backends", "ops"):
        guard.exec_blocked()  # a backend's signals cannot stop the judge
    guard.install()
    try:
        return int(args.func(args))
    except KeyboardInterrupt as exc:  # stopped by a signal from outside the judge
        return 128 + int(getattr(exc, "signum", signal.SIGINT))
    except UsageError as exc:
        print(f"lmspec: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `lmspec ops --json | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    raise SystemExit(main())
