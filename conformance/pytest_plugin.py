"""Running the conformance suite as a pytest session (so ``--jobs N`` is pytest-xdist).

``lmspec run`` writes its selection to a private file (JSON: the backends' descriptors
and plugin sources, ops, dtypes, checks, settings), names it in the environment variable
``LMSPEC_RUN_CONFIG_FILE`` (one variable can hold at most 128 KiB, a file any size) and
runs ``pytest -p lmspec.conformance.pytest_plugin --pyargs lmspec.conformance.suite``;
every xdist worker rebuilds the same target list from it. Each test item is one
(backend, op, dtype, check) and hands its result record back to the controlling process
through ``user_properties`` (which xdist forwards).

A pytest process here is a *judge*: it never imports plugin code. Each backend is served
by a host child process of its plugin (:mod:`lmspec.backends.remote`), started on the
first call and shared by the checks of that process.
"""

from __future__ import annotations

import json
import os
from functools import cache
from typing import Any

import pytest

from lmspec.backends.remote import DEFAULT_TIMEOUT_S, HostProcess, RemoteBackend

from .harness import Settings, Target, run_target, targets

CONFIG_ENV = "LMSPEC_RUN_CONFIG_FILE"
RESULT_KEY = "lmspec_result"

HOSTS: dict[tuple[str, str], HostProcess] = {}
"""Host processes of this judge by plugin source (``lmspec run --jobs 1`` lends the
ones its backend table already started)."""


@cache
def config() -> dict[str, Any]:
    path = os.environ.get(CONFIG_ENV)
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _timeout() -> float:
    return float(config().get("timeout", DEFAULT_TIMEOUT_S))


@cache
def backends() -> dict[str, RemoteBackend]:
    """The selected backends, each served by the host of its plugin."""
    out = {}
    for b in config().get("backends", []):
        key = (b["source"][0], b["source"][1])
        if key not in HOSTS:
            HOSTS[key] = HostProcess([key], _timeout())
        out[b["descriptor"]["name"]] = RemoteBackend(b["descriptor"], HOSTS[key])
    return out


def selected_targets() -> list[Target]:
    import lmspec

    cfg = config()
    ops = cfg.get("ops") or list(lmspec.OPS)
    todo = targets(list(backends().values()), ops, cfg.get("dtypes"), cfg.get("checks"))
    wanted = cfg.get("targets")
    return [t for t in todo if t.id in set(wanted)] if wanted is not None else todo


def settings() -> Settings:
    cfg = config()
    return Settings(profile=cfg.get("profile", "default"), max_examples=cfg.get("max_examples"),
                    seed=int(cfg.get("seed", 0)), call_timeout_s=_timeout(),
                    replay_args=tuple(cfg.get("replay_args", ())),
                    shapes=cfg.get("shapes", "small"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lmspec_target" in metafunc.fixturenames:
        ts = selected_targets()
        metafunc.parametrize("lmspec_target", ts, ids=[t.id for t in ts])


def close_hosts() -> None:
    """Close every host this judge started or was lent."""
    for h in HOSTS.values():
        h.close()
    HOSTS.clear()


def pytest_configure(config: pytest.Config) -> None:
    """A worker is a judge too: it takes its own signals (its hosts' are ignored) and,
    stopped from outside, kills its hosts and leaves at once."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from lmspec.backends import guard

        def leave(signum: int) -> None:
            guard.kill_descendants()
            os._exit(128 + signum)

        guard.install()
        guard.set_on_stop(leave)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Hosts this judge started go with it (``lmspec run --jobs 1`` closes its own)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        close_hosts()


def check(target: Target, record: Any) -> dict[str, Any]:
    """Run one target in this process and report it to pytest."""
    backend = backends()[target.backend]
    result = run_target(backend, target, settings(), backend.deviations)
    record(RESULT_KEY, result)
    status = result["status"]
    if status in ("fail", "error"):
        pytest.fail(f"{status}: {result['message']}", pytrace=False)
    if status in ("unsupported", "skipped"):
        pytest.skip(f"{status}: {result['message']}")
    return result
