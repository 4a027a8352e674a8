"""One conformance run that survives: a journal, signals, and a report whatever happens.

``lmspec run`` hands :func:`execute` its :class:`~lmspec.conformance.plan.RunPlan` (and,
for one job, the hosts its backends are already loaded in). The checks run as a pytest
session (in this process for one job, under pytest-xdist for more, each worker reading the
plan from a private file); each result comes back as a
:class:`~lmspec.conformance.record.CheckResult`, and each finished check is appended to
a journal in the report directory as it arrives.
``SIGINT``/``SIGTERM`` from outside the judge (:mod:`lmspec.backends.guard`: a backend's
signals are ignored) stop the session at once; the checks finished by then are kept and
the rest become ``skipped`` with the reason ``interrupted``, so the report is valid and
marked ``"incomplete": true``. A controller that dies outright
leaves the journal, from which ``lmspec report --journal FILE`` writes the report.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmspec.backends import guard
from lmspec.backends.host import cut

from .plan import RunPlan, Target
from .record import CheckResult

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""Exit status of a run stopped by a signal (128 + the signal's number)."""


Interrupted = guard.Interrupted


def check_report_dir(directory: str | Path) -> Path:
    """Create ``directory`` and prove it writable before the first check (``OSError``
    with one line otherwise)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise OSError(f"--report-dir {d} exists and is not a directory")
    d.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=d, prefix=".lmspec-write-test-")
    try:
        os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)
        os.unlink(probe)
    return d


def unrun(t: Target, message: str, status: str = "skipped") -> CheckResult:
    """The record of a check that produced no result."""
    return CheckResult(t.backend, t.op, t.dtype, t.check, status=status, message=message)


def _key_path(journal: Path) -> Path:
    """Where the judge keeps a journal's key: in the user's state directory, which a
    sandboxed host cannot see (its home is private), never beside the journal."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    name = hashlib.sha256(str(journal.resolve()).encode()).hexdigest()[:32]
    return base / "lmspec" / "journal-keys" / f"{name}.key"


def _mac(key: bytes, record: dict[str, Any]) -> str:
    body = json.dumps(record, allow_nan=False, default=str, sort_keys=True).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


class Journal:
    """An append-only JSON-lines file: a header, then one result per finished check, each
    line authenticated (``"mac"``: HMAC-SHA256 with a key of this run that only the judge
    holds), so lines that anything else appends are dropped when a report is rebuilt."""

    def __init__(self, directory: Path, header: dict[str, Any]):
        self.path = directory / f".lmspec-run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}" \
            ".journal.jsonl"
        self.key = secrets.token_bytes(32)
        self.key_path = _key_path(self.path)
        self.key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.write({"journal": 1, **header})

    def write(self, record: dict[str, Any]) -> None:
        record = json.loads(json.dumps(record, allow_nan=False, default=str))
        self._f.write(json.dumps({**record, "mac": _mac(self.key, record)}, allow_nan=False)
                      + "\n")
        self._f.flush()

    def close(self, remove: bool) -> None:
        self._f.close()
        if remove:
            self.path.unlink(missing_ok=True)
            self.key_path.unlink(missing_ok=True)


def read_journal(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A journal's header and the results it holds whose lines authenticate (a torn last
    line is ignored); ``header["dropped"]`` counts the lines that did not."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty journal")
    try:
        key = _key_path(Path(path)).read_bytes()
    except OSError:
        raise ValueError(f"{path}: the key of this journal is gone (it is kept in "
                         f"{_key_path(Path(path)).parent}), so no line can be trusted") from None
    records, dropped = [], 0
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        mac = rec.pop("mac", None) if isinstance(rec, dict) else None
        if isinstance(mac, str) and hmac.compare_digest(mac, _mac(key, rec)):
            records.append(rec)
        else:
            dropped += 1
    if not records or records[0].get("journal") != 1:
        raise ValueError(f"{path}: not an lmspec journal, or its header does not authenticate")
    header, results = records[0], records[1:]
    header["dropped"] = dropped
    return header, results


class Collector:
    """pytest plugin (controller side) that gathers the results as they arrive, by the
    planned target of each test item."""

    def __init__(self, plan: RunPlan, on_result: Callable[[CheckResult], None]):
        self.results: dict[Target, CheckResult] = {}
        self.on_result = on_result
        self._by_id = {t.id: t for t in plan.targets}
        self.internal_error: str | None = None
        """The first internal error of the session (a worker's arrives formatted), in a
        line: the reason given to the checks it left without a result."""

    def pytest_internalerror(self, excrepr: Any, excinfo: Any) -> None:
        if self.internal_error is None:
            lines = [ln.strip(" E>") for ln in str(excrepr).splitlines()]
            said = [ln for ln in lines if ln and ":" in ln and ln.split(":", 1)[0].replace(
                ".", "").replace("_", "").isalnum() and not ln.startswith("File")]
            self.internal_error = cut(said[-1] if said else repr(excinfo.value), 300)

    def pytest_runtest_logreport(self, report: Any) -> None:
        from .pytest_plugin import RESULT_KEY

        res = dict(report.user_properties).get(RESULT_KEY)
        # the item's parameter is its target's id (pytest_plugin.pytest_generate_tests)
        target = self._by_id.get(report.nodeid.rpartition("[")[2].rstrip("]"))
        if target is None or target in self.results:
            return
        if res is None:
            if not report.failed or guard.stopping():
                return
            # the judge crashed outside the harness (e.g. an xdist worker died)
            result = unrun(target, (report.longreprtext or "crashed")[-2000:], "error")
        else:
            result = CheckResult.from_json(json.loads(res))
            if (result.backend, result.op, result.dtype, result.check) != (
                    target.backend, target.op, target.dtype, target.check):
                result = unrun(target, f"the judge returned the result of {result.id} for "
                               "this check", "error")
        self.results[target] = result
        self.on_result(result)


def _terminate_children() -> None:
    """SIGTERM to this process's children (xdist workers, backend hosts), so that a
    stopped run does not wait for the checks in flight (Linux; elsewhere xdist's own
    shutdown waits for them)."""
    for task in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        try:
            pids = [int(p) for p in task.read_text().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass


def execute(plan: RunPlan, jobs: int, on_result: Callable[[CheckResult], None],
            hosts: dict[tuple[str, str], Any] | None = None,
            ) -> tuple[list[CheckResult], int | None]:
    """Run ``plan`` as a pytest session of ``jobs`` workers (``hosts``: hosts already
    started, lent to a one-job session); a result for every planned target, in the plan's
    order, and the signal that stopped the run, if any."""
    import pytest

    from .pytest_plugin import PLAN_ENV, Judge

    collector = Collector(plan, on_result)
    judge = Judge(plan, hosts if jobs == 1 else None)
    pytest_args = ["-p", "lmspec.conformance.pytest_plugin", "-p", "no:cacheprovider",
                   "-p", "no:terminal", "-o", "addopts=", "--rootdir", os.getcwd(),
                   "--pyargs", "lmspec.conformance.suite"]
    if jobs > 1:
        pytest_args += ["-n", str(jobs)]
    stopped: list[int] = []
    old = os.environ.get(PLAN_ENV)
    plan_dir = tempfile.mkdtemp(prefix="lmspec-run-")  # mode 0700
    plan_path = Path(plan_dir) / "plan.json"
    plan.write(plan_path)
    os.environ[PLAN_ENV] = str(plan_path)
    code: Any = None
    try:
        with guard.on_stop(lambda signum: _terminate_children()):
            code = pytest.main(pytest_args, plugins=[collector, judge])
    except KeyboardInterrupt:
        stopped.append(guard.stopping() or signal.SIGINT)
    finally:
        if old is None:
            os.environ.pop(PLAN_ENV, None)
        else:
            os.environ[PLAN_ENV] = old
        plan_path.unlink(missing_ok=True)
        os.rmdir(plan_dir)
        judge.close()
        for host in (hosts or {}).values():  # lent ones too: the checks are over
            host.close()
        guard.kill_descendants()  # whatever a host left behind goes before the report
    if guard.stopping() and not stopped:
        stopped.append(guard.stopping())
    if code == pytest.ExitCode.INTERRUPTED and not stopped:
        stopped.append(signal.SIGINT)
    results = []
    for t in plan.targets:
        r = collector.results.get(t)
        if r is None:
            r = unrun(t, "interrupted: the run was stopped before this check finished") if (
                stopped) else unrun(t, "no result was produced: " + (
                    f"the judge's pytest session failed ({collector.internal_error})"
                    if collector.internal_error else f"pytest exit code {code}"), "error")
        results.append(r)
    return results, (stopped[0] if stopped else None)
