"""Running the conformance suite as a pytest session (so ``--jobs N`` is pytest-xdist).

``lmspec run`` decides the run once, as a :class:`~lmspec.conformance.plan.RunPlan`, writes
it to a private file named by the environment variable ``LMSPEC_RUN_PLAN_FILE`` and runs
``pytest -p lmspec.conformance.pytest_plugin --pyargs lmspec.conformance.suite`` with a
:class:`Judge` of that plan. Each pytest-xdist worker reads the same file and makes its
own :class:`Judge`; no worker rebuilds or filters the targets. Each test item is one
planned target, and hands its :class:`~lmspec.conformance.record.CheckResult` (as JSON text)
back to the controlling process through ``user_properties`` (which xdist forwards).

A pytest process here is a *judge*: it never imports plugin code. Each backend is served
by a host child process of its plugin (:mod:`lmspec.backends.remote`), started on the
first call and shared by the checks of that judge.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from lmspec.backends.remote import HostProcess, RemoteBackend

from .plan import RunPlan, Target
from .record import CheckResult
from .search import run_target

PLAN_ENV = "LMSPEC_RUN_PLAN_FILE"
RESULT_KEY = "lmspec_result"


class Judge:
    """The judge of one pytest session: a run plan and the hosts serving its backends.

    ``hosts`` lends hosts already started (``lmspec run --jobs 1`` lends the ones its
    backend table started); a judge closes only the hosts it started itself.
    """

    def __init__(self, plan: RunPlan, hosts: dict[tuple[str, str], HostProcess] | None = None):
        self.plan = plan
        self.hosts: dict[tuple[str, str], HostProcess] = dict(hosts or {})
        self._lent = set(self.hosts)
        self._backends: dict[str, RemoteBackend] = {}

    def backend(self, name: str) -> RemoteBackend:
        """The planned backend ``name``, served by the host of its plugin."""
        if name not in self._backends:
            b = next(b for b in self.plan.backends if b.name == name)
            if b.source not in self.hosts:
                self.hosts[b.source] = HostProcess([b.source], self.plan.settings.call_timeout_s)
            self._backends[name] = RemoteBackend(b.descriptor, self.hosts[b.source])
        return self._backends[name]

    def run(self, target: Target) -> CheckResult:
        """Run one planned check in this process."""
        backend = self.backend(target.backend)
        return CheckResult.from_json(
            run_target(backend, target, self.plan.settings, backend.deviations))

    def close(self) -> None:
        """Close the hosts this judge started (lent ones stay with their lender)."""
        for key, host in list(self.hosts.items()):
            if key not in self._lent:
                host.close()
                del self.hosts[key]
        self._backends.clear()

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.close()


def judge_of(config: pytest.Config) -> Judge | None:
    """The :class:`Judge` registered with this pytest session, if any."""
    return next((p for p in config.pluginmanager.get_plugins() if isinstance(p, Judge)), None)


def pytest_configure(config: pytest.Config) -> None:
    """A session without a judge (a pytest-xdist worker, or ``pytest`` started by hand
    with ``LMSPEC_RUN_PLAN_FILE``) makes one from the plan file. A worker is a judge too: it
    takes its own signals (its hosts' are ignored) and, stopped from outside, kills its
    hosts and leaves at once."""
    if judge_of(config) is None and os.environ.get(PLAN_ENV):
        config.pluginmanager.register(Judge(RunPlan.read(os.environ[PLAN_ENV])), "lmspec-judge")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from lmspec.backends import guard

        def leave(signum: int) -> None:
            guard.kill_descendants()
            os._exit(128 + signum)

        guard.install()
        guard.set_on_stop(leave)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lmspec_target" in metafunc.fixturenames:
        judge = judge_of(metafunc.config)
        ts = list(judge.plan.targets) if judge else []
        metafunc.parametrize("lmspec_target", ts, ids=[t.id for t in ts])


@pytest.fixture
def lmspec_judge(request: pytest.FixtureRequest) -> Judge:
    judge = judge_of(request.config)
    if judge is None:
        pytest.fail(f"no run plan: run the suite with `lmspec run`, or name a plan file in "
                    f"{PLAN_ENV}", pytrace=False)
    return judge


def check(judge: Judge, target: Target, record: Any) -> CheckResult:
    """Run one target and report it to pytest (its record through ``record``)."""
    result = judge.run(target)
    # as JSON text: xdist's wire format refuses Python ints beyond 32 bits (a counterexample
    # may hold one), which crashed the worker and lost every check after it
    record(RESULT_KEY, json.dumps(result.to_json(), default=str))
    if result.status in ("fail", "error"):
        pytest.fail(f"{result.status}: {result.message}", pytrace=False)
    if result.status in ("unsupported", "skipped"):
        pytest.skip(f"{result.status}: {result.message}")
    return result
