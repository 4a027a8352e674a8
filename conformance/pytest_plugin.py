"""Running the conformance suite as a pytest session (so ``--jobs N`` is pytest-xdist).

``lmspec run`` puts its selection in the environment variable ``LMSPEC_RUN_CONFIG``
(JSON) and runs ``pytest -p lmspec.conformance.pytest_plugin --pyargs
lmspec.conformance.suite``; every xdist worker rebuilds the same target list from it.
Each test item is one (backend, op, dtype, check) and hands its result record back to
the controlling process through ``user_properties`` (which xdist forwards).
"""

from __future__ import annotations

import json
import os
from functools import cache
from typing import Any

import pytest

from lmspec.backends.registry import Registry

from .harness import Settings, Target, run_target, targets

CONFIG_ENV = "LMSPEC_RUN_CONFIG"
RESULT_KEY = "lmspec_result"


@cache
def config() -> dict[str, Any]:
    raw = os.environ.get(CONFIG_ENV)
    return json.loads(raw) if raw else {}


@cache
def registry() -> Registry:
    return Registry.default(config().get("plugins", ()))


def selected_targets() -> list[Target]:
    cfg = config()
    reg = registry()
    entries = [reg.get(n) for n in cfg.get("backends", [])] if cfg.get("backends") else (
        reg.available())
    backends = [e.backend for e in entries if e is not None and e.ok]
    import lmspec

    ops = cfg.get("ops") or list(lmspec.OPS)
    return targets(backends, ops, cfg.get("dtypes"), cfg.get("checks"))


def settings() -> Settings:
    cfg = config()
    return Settings(profile=cfg.get("profile", "default"), max_examples=cfg.get("max_examples"),
                    seed=int(cfg.get("seed", 0)), replay_args=tuple(cfg.get("replay_args", ())))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lmspec_target" in metafunc.fixturenames:
        ts = selected_targets()
        metafunc.parametrize("lmspec_target", ts, ids=[t.id for t in ts])


def check(target: Target, record: Any) -> dict[str, Any]:
    """Run one target in this process and report it to pytest."""
    entry = registry().get(target.backend)
    backend = entry.backend
    deviations = getattr(backend, "deviations", None) or {}
    result = run_target(backend, target, settings(), dict(deviations))
    record(RESULT_KEY, result)
    status = result["status"]
    if status in ("fail", "error"):
        pytest.fail(f"{status}: {result['message']}", pytrace=False)
    if status in ("unsupported", "skipped"):
        pytest.skip(f"{status}: {result['message']}")
    return result
