"""pytest plugin: a backend's conformance checks as test items (entry point ``pytest11``).

``pytest --lmspec-backend NAME`` adds one test item per (op, dtype, check) of the
backend — the targets of ``lmspec run --backend NAME`` with the same options — named
``lmspec-NAME::op[dtype-check]``, so ``-k``, ``-n`` (pytest-xdist), ``--junitxml`` and
the rest of pytest apply. A failing item shows the verdict, the tolerance, the shrunk
counterexample and the commands that replay it. Without ``--lmspec-backend`` the plugin
adds nothing and imports nothing beyond this module.

Backends are loaded as ``lmspec run`` loads them: each plugin in a host process of its
own (:class:`lmspec.backends.discovery.BackendTable`), never imported into pytest.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest

from .profiles import DTYPE_NAMES, PROFILES, profile_help

_STATE = pytest.StashKey["_Session"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("lmspec", "lmspec conformance checks of a backend")
    g.addoption("--lmspec-backend", action="append", default=[], metavar="NAME",
                help="add the conformance checks of this backend as test items (repeatable)")
    g.addoption("--lmspec-op", action="append", default=[], metavar="GLOB",
                help="only ops matching this glob (repeatable; default: every op)")
    g.addoption("--lmspec-dtype", action="append", default=[], metavar="D",
                choices=DTYPE_NAMES, help="only this dtype (repeatable)")
    g.addoption("--lmspec-check", action="append", default=[], metavar="CHECK",
                help="only this check: forward, vjp or a property name (repeatable)")
    g.addoption("--lmspec-profile", choices=list(PROFILES), default="default",
                help=profile_help())
    g.addoption("--lmspec-max-examples", type=int, default=None, metavar="N")
    g.addoption("--lmspec-seed", type=int, default=0, metavar="N")
    g.addoption("--lmspec-plugin", action="append", default=[], metavar="MOD",
                help="also load this plugin module (it must be importable, e.g. PYTHONPATH=.)")
    g.addoption("--lmspec-timeout", type=float, default=30.0, metavar="SECONDS",
                help="limit on one backend call (default: 30)")
    g.addoption("--lmspec-only", action="store_true",
                help="run the lmspec items only (deselect every other collected test)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("lmspec_backend"):
        config.stash[_STATE] = _Session(config)
        config.addinivalue_line("markers", "lmspec: a conformance check of an lmspec backend")


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselect
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    if config.getoption("lmspec_only") and items:
        config.hook.pytest_deselected(items=list(items))
        items.clear()
    items.extend(state.items(session))


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is not None:
        state.close()


class _Session:
    """The backend table and settings of this pytest process (each xdist worker has its
    own, loaded at collection)."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.table: Any = None

    def opt(self, name: str) -> Any:
        return self.config.getoption(name)

    def settings(self) -> Any:
        from .harness import Settings

        replay = [a for m in self.opt("lmspec_plugin") for a in ("--plugin", m)]
        return Settings(profile=self.opt("lmspec_profile"),
                        max_examples=self.opt("lmspec_max_examples"),
                        seed=self.opt("lmspec_seed"), call_timeout_s=self.opt("lmspec_timeout"),
                        replay_args=tuple(replay))

    def _ops(self) -> list[str]:
        import lmspec

        globs = self.opt("lmspec_op")
        if not globs:
            return list(lmspec.OPS)
        for g in globs:
            if not any(fnmatch.fnmatchcase(o, g) for o in lmspec.OPS):
                raise pytest.UsageError(f"--lmspec-op {g!r} matches no op of the catalogue")
        return [o for o in lmspec.OPS if any(fnmatch.fnmatchcase(o, g) for g in globs)]

    def items(self, session: pytest.Session) -> list[pytest.Item]:
        from lmspec.backends.discovery import BackendTable
        from lmspec.backends.registry import BUILTIN_NAMES

        from .harness import targets

        names = self.opt("lmspec_backend")
        ops = self._ops()
        if (n := self.opt("lmspec_max_examples")) is not None and n < 1:
            raise pytest.UsageError("--lmspec-max-examples must be at least 1")
        self.table = BackendTable.default(
            self.opt("lmspec_plugin"), self.opt("lmspec_timeout"),
            only_builtin=all(n in BUILTIN_NAMES for n in names))
        chosen = []
        for n in names:
            e = self.table.get(n)
            if e is None:
                known = ", ".join(x.name for x in self.table.entries) or "none"
                self.close()
                raise pytest.UsageError(f"--lmspec-backend {n!r} is not registered (known: "
                                        f"{known})")
            self.table.check([e])
            if not e.ok:
                self.close()
                raise pytest.UsageError(f"--lmspec-backend {n!r} cannot run here: {e.status}")
            chosen.append(e)
        used = {id(e.host) for e in chosen}
        for h in self.table.hosts:  # hosts of plugins not asked for go at once
            if id(h) not in used:
                h.close()
        settings = self.settings()
        out: list[pytest.Item] = []
        for e in chosen:
            backend = e.backend()
            parent = LmspecBackend.from_parent(session, name=f"lmspec-{e.name}",
                                               nodeid=f"lmspec-{e.name}")
            for t in targets([backend], ops, self.opt("lmspec_dtype") or None,
                             self.opt("lmspec_check") or None):
                item = LmspecItem.from_parent(parent, name=f"{t.op}[{t.dtype}-{t.check}]")
                item.setup_target(t, backend, settings)
                out.append(item)
        return out

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None


class LmspecBackend(pytest.Collector):
    """The items of one backend (filled in at collection, not by ``collect``)."""

    def collect(self) -> list[Any]:
        return []


class LmspecFailure(Exception):
    """A check that failed or errored; carries its result record."""

    def __init__(self, result: dict[str, Any]):
        super().__init__(result["message"])
        self.result = result


class LmspecItem(pytest.Item):
    """One (backend, op, dtype, check): one Hypothesis search through the harness."""

    def setup_target(self, target: Any, backend: Any, settings: Any) -> None:
        self.target, self.backend, self.settings = target, backend, settings
        self.add_marker("lmspec")
        for kw in (target.op, target.dtype, target.check):
            self.keywords[kw] = True

    def runtest(self) -> None:
        from .harness import run_target

        r = run_target(self.backend, self.target, self.settings, self.backend.deviations)
        for key in ("status", "examples", "worst_ratio", "max_abs_err", "message",
                    "reproduce"):
            if r.get(key) not in (None, ""):
                self.user_properties.append((f"lmspec_{key}", r[key]))
        if r["status"] in ("fail", "error"):
            raise LmspecFailure(r)
        if r["status"] in ("unsupported", "skipped"):
            pytest.skip(f"{r['status']}: {r['message']}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> Any:
        if isinstance(excinfo.value, LmspecFailure):
            from .api import describe_failure

            r = excinfo.value.result
            t, s = self.target, self.settings
            again = (f"pytest --lmspec-backend {t.backend} --lmspec-op {t.op} --lmspec-dtype "
                     f"{t.dtype} --lmspec-check {t.check} --lmspec-seed {s.seed} "
                     f"--lmspec-max-examples {s.examples}"
                     + "".join(f" --lmspec-plugin {m}" for m in self.config.getoption(
                         "lmspec_plugin")))
            return (f"lmspec: {t.backend} does not conform\n"
                    + describe_failure(r, f"backend.{t.op}", "backend.vjp") + f"\n  or: {again}")
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"lmspec {self.target.id}"
