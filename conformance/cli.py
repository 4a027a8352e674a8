"""The ``lmspec`` command line (CONTRACT §4): backends, ops, run, compare."""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

import lmspec
from lmspec._precision import DTYPES

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or configuration: exit 2."""


def _registry(plugins: Sequence[str] = ()):
    from lmspec.backends.registry import Registry

    return Registry.default(plugins)


def _backend_row(e: Any) -> dict[str, Any]:
    version = e.plugin.version
    info: dict[str, Any] = {}
    if e.ok and callable(getattr(e.backend, "info", None)):
        try:
            info = dict(e.backend.info())
        except Exception as exc:  # noqa: BLE001 - info() is optional decoration
            info = {"error": f"info() raised {type(exc).__name__}: {exc}"}
    return {"name": e.name, "device": e.device, "dtypes": list(e.dtypes),
            "plugin": e.plugin.label, "source": e.plugin.source, "version": version,
            "status": e.status, "info": info}


# -- lmspec backends -------------------------------------------------------------------

def cmd_backends(args: argparse.Namespace) -> int:
    reg = _registry(args.plugin)
    rows = [_backend_row(e) for e in reg.all()]
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return EXIT_OK
    print(tabulate([[r["name"], r["device"], ", ".join(r["dtypes"]), r["plugin"], r["status"]]
                    for r in rows], ["backend", "device", "dtypes", "plugin", "status"]))
    return EXIT_OK


# -- lmspec ops --------------------------------------------------------------------

def cmd_ops(args: argparse.Namespace) -> int:
    from lmspec.conformance.harness import checks_of

    reg = _registry(args.plugin)
    entries = [e for e in reg.all() if e.backend is not None]
    rows = []
    for name, d in lmspec.OPS.items():
        rows.append({"op": name, "family": d.family, "diff": list(d.diff),
                     "checks": checks_of(name),
                     "backends": [e.name for e in entries if _implements(e.backend, name)],
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
    """The catalogue as a Markdown table (the README's table is this output)."""
    import inspect

    from lmspec.conformance.harness import checks_of

    rows = [[f"`{name}`", d.family, f"`{name}{inspect.signature(d.reference)}`",
             ", ".join(f"`{a}`" for a in d.diff) or "—",
             ", ".join(c for c in checks_of(name) if c not in ("forward", "vjp")) or "—"]
            for name, d in lmspec.OPS.items()]
    return tabulate(rows, ["op", "family", "signature", "differentiable in", "properties"],
                    tablefmt="github") + "\n"


def _implements(backend: Any, op: str) -> bool:
    try:
        return callable(getattr(backend, op, None))
    except Exception:  # noqa: BLE001 - a backend whose attribute lookup fails implements nothing
        return False


# -- lmspec run --------------------------------------------------------------------

def _select_ops(globs: Sequence[str]) -> list[str]:
    if not globs:
        return list(lmspec.OPS)
    ops: list[str] = []
    for g in globs:
        hit = [o for o in lmspec.OPS if fnmatch.fnmatchcase(o, g)]
        if not hit:
            raise UsageError(f"--op {g!r} matches no op; the catalogue has: "
                             + ", ".join(lmspec.OPS))
        ops += [o for o in hit if o not in ops]
    return [o for o in lmspec.OPS if o in ops]


def _select_backends(reg: Any, names: Sequence[str]) -> list[Any]:
    if not names:
        chosen = reg.available()
        if not chosen:
            raise UsageError("no backend is available; see `lmspec backends`")
        return chosen
    chosen = []
    for n in names:
        e = reg.get(n)
        if e is None:
            known = ", ".join(x.name for x in reg.all()) or "none"
            raise UsageError(f"--backend {n!r} is not registered (known: {known})")
        if not e.ok:
            raise UsageError(f"backend {n!r} cannot run here: {e.status}")
        chosen.append(e)
    return chosen


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


class Collector:
    """pytest plugin (controller side) that gathers result records as they arrive."""

    def __init__(self, progress: Progress):
        self.results: dict[str, dict[str, Any]] = {}
        self.progress = progress

    def pytest_runtest_logreport(self, report: Any) -> None:
        from lmspec.conformance.pytest_plugin import RESULT_KEY

        res = dict(report.user_properties).get(RESULT_KEY)
        key = report.nodeid.split("[", 1)[-1].rstrip("]")
        if res is None:
            if report.failed and key not in self.results:
                # the check crashed outside the harness (e.g. a worker died): keep it as an error
                b, op, dt, check = (key.split("::") + ["", "", "", ""])[:4]
                res = {"backend": b, "op": op, "dtype": dt, "check": check, "status": "error",
                       "examples": 0, "max_abs_err": 0.0, "max_rel_err": 0.0, "worst_ratio": 0.0,
                       "tolerance": None, "counterexample": None, "reproduce": None,
                       "message": (report.longreprtext or "crashed")[-2000:]}
            else:
                return
        if key in self.results:
            return
        self.results[key] = res
        self.progress(res)


def cmd_run(args: argparse.Namespace) -> int:
    import pytest

    from lmspec.conformance import harness, pytest_plugin, report

    for d in args.dtype or ():
        if d not in DTYPES:
            raise UsageError(f"--dtype {d!r} is not one of {', '.join(DTYPES)}")
    if args.max_examples is not None and args.max_examples < 1:
        raise UsageError("--max-examples must be at least 1")
    reg = _registry(args.plugin)
    for e in reg.all():
        if e.status.startswith("failed to load"):
            print(f"warning: plugin {e.plugin.label}: {e.status}", file=sys.stderr)
    entries = _select_backends(reg, args.backend)
    ops = _select_ops(args.op)
    known_checks = {c for op in ops for c in harness.checks_of(op)}
    for c in args.check or ():
        if c not in known_checks:
            raise UsageError(f"--check {c!r} is not a check of the selected ops "
                             f"(known: {', '.join(sorted(known_checks))})")
    backends = [e.backend for e in entries]
    todo = harness.targets(backends, ops, args.dtype, args.check)
    if not todo:
        raise UsageError("the selection is empty (do the backends declare the --dtype asked?)")
    replay: list[str] = []
    for e in entries:
        if e.plugin.source in ("--plugin", "LMSPEC_PLUGINS"):
            replay += ["--plugin", e.plugin.module]
    cfg = {"backends": [e.name for e in entries], "ops": ops, "dtypes": args.dtype,
           "checks": args.check, "plugins": list(args.plugin), "profile": args.profile,
           "max_examples": args.max_examples, "seed": args.seed, "replay_args": replay}
    settings = harness.Settings(args.profile, args.max_examples, args.seed)
    print(f"lmspec {lmspec.__version__}: {len(todo)} checks on "
          f"{', '.join(e.name for e in entries)} ({len(ops)} ops; profile {args.profile}, "
          f"{settings.examples} examples per check, seed {args.seed})", file=sys.stderr)
    progress = Progress(len(todo))
    collector = Collector(progress)
    pytest_args = ["-p", "lmspec.conformance.pytest_plugin", "-p", "no:cacheprovider",
                   "-p", "no:terminal", "-o", "addopts=", "--rootdir", os.getcwd(),
                   "--pyargs", "lmspec.conformance.suite"]
    if args.jobs and args.jobs > 1:
        pytest_args += ["-n", str(args.jobs)]
    t0 = time.perf_counter()
    old = os.environ.get(pytest_plugin.CONFIG_ENV)
    os.environ[pytest_plugin.CONFIG_ENV] = json.dumps(cfg)
    pytest_plugin.config.cache_clear()
    pytest_plugin.registry.cache_clear()
    try:
        code = pytest.main(pytest_args, plugins=[collector])
    finally:
        progress.close()
        if old is None:
            os.environ.pop(pytest_plugin.CONFIG_ENV, None)
        else:
            os.environ[pytest_plugin.CONFIG_ENV] = old
    order = {t.id: i for i, t in enumerate(todo)}
    results = [collector.results[k] for k in sorted(collector.results, key=lambda k: order.get(
        k, len(order)))]
    missing = [t for t in todo if t.id not in collector.results]
    for t in missing:  # nothing is lost: a check that produced no result is an error
        results.append({"backend": t.backend, "op": t.op, "dtype": t.dtype, "check": t.check,
                        "status": "error", "examples": 0, "max_abs_err": 0.0, "max_rel_err": 0.0,
                        "worst_ratio": 0.0, "tolerance": None, "counterexample": None,
                        "reproduce": None,
                        "message": f"no result was produced (pytest exit code {int(code)})"})
    rep = report.build(results, {
        "profile": args.profile, "max_examples": settings.examples, "seed": args.seed,
        "ops": ops, "dtypes": args.dtype or sorted({t.dtype for t in todo}, key=list(DTYPES).index),
        "checks": args.check or "all", "backends": [e.name for e in entries]},
        [_backend_row(e) for e in reg.all()], time.perf_counter() - t0)
    jpath, mpath = report.write(rep, args.report_dir)
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
    print(f"written: {jpath} and {mpath}")
    return EXIT_FAIL if bad else EXIT_OK


# -- lmspec compare ----------------------------------------------------------------

def cmd_compare(args: argparse.Namespace) -> int:
    from lmspec.conformance import report

    reps = []
    for p in args.reports:
        try:
            reps.append((p, report.load(p)))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read report {p}: {exc}") from exc
    print(report.compare_table(reps), end="")
    return EXIT_OK


# -- entry point -------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmspec", description=lmspec.__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"lmspec {lmspec.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def plugin_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--plugin", action="append", default=[], metavar="MOD",
                        help="also load this plugin module (repeatable)")

    b = sub.add_parser("backends", help="list every backend and its status")
    b.add_argument("--json", action="store_true")
    plugin_opt(b)
    b.set_defaults(func=cmd_backends)

    o = sub.add_parser("ops", help="list the op catalogue")
    o.add_argument("--json", action="store_true")
    o.add_argument("--markdown", action="store_true", help="the catalogue as a Markdown table")
    plugin_opt(o)
    o.set_defaults(func=cmd_ops)

    r = sub.add_parser("run", help="run the conformance suite and write a report")
    r.add_argument("--backend", action="append", default=[], metavar="NAME")
    r.add_argument("--op", action="append", default=[], metavar="GLOB")
    r.add_argument("--dtype", action="append", default=None, metavar="D")
    r.add_argument("--check", action="append", default=None, metavar="CHECK",
                   help="only this check: forward, vjp or a property name (repeatable)")
    r.add_argument("--profile", choices=["quick", "default", "thorough"], default="default")
    r.add_argument("--max-examples", type=int, default=None, metavar="N")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--report-dir", default="reports", metavar="DIR")
    r.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="parallel workers (pytest-xdist)")
    plugin_opt(r)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="one side-by-side table of several reports")
    c.add_argument("reports", nargs="+", metavar="REPORT.json")
    c.set_defaults(func=cmd_compare)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"lmspec: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
