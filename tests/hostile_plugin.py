"""Hostile backends for the isolation tests: each misbehaves in one way in ``softmax``
(and otherwise answers correctly). Loaded with ``--plugin hostile_plugin`` or
``LMSPEC_PLUGINS=hostile_plugin``; ``HOSTILE_AT_IMPORT`` makes the import itself
misbehave (``exit``, ``print``, ``hang``).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import numpy as np

import lmspec

_AT_IMPORT = os.environ.get("HOSTILE_AT_IMPORT", "")
if _AT_IMPORT == "exit":
    os._exit(3)
if _AT_IMPORT == "print":
    print("garbage printed by a plugin at import")
if _AT_IMPORT == "hang":
    time.sleep(3600)


def _uniform(x: np.ndarray, axis: int) -> np.ndarray:
    return np.full_like(x, 1.0 / x.shape[axis]) if x.size else x.copy()


def _segfault() -> None:
    ctypes.string_at(0)


def _c_sleep() -> None:
    libc = ctypes.CDLL(None)
    libc.sleep(3600)  # inside C: no Python signal handler can run


BEHAVIOURS = {
    "raises": lambda x, axis: (_ for _ in ()).throw(RuntimeError("boom")),
    "wrong-shape": lambda x, axis: np.zeros((1,) + x.shape),
    "nan": lambda x, axis: np.full_like(x, np.nan),
    "nested-list": lambda x, axis: [[0.5, 0.5], [0.5, [0.5]]],
    "mutate-before": lambda x, axis: (x.__setitem__(Ellipsis, 0), _uniform(x, axis))[1],
    "mutate-after": lambda x, axis: (lambda out: (x.__setitem__(Ellipsis, 0), out)[1])(
        lmspec.softmax(x, axis)),
    "hang": lambda x, axis: time.sleep(3600),
    "hang-in-c": lambda x, axis: _c_sleep(),
    "exit": lambda x, axis: os._exit(7),
    "segfault": lambda x, axis: _segfault(),
    "keyboard-interrupt": lambda x, axis: (_ for _ in ()).throw(KeyboardInterrupt()),
    "system-exit": lambda x, axis: sys.exit(4),
    "huge-message": lambda x, axis: (_ for _ in ()).throw(ValueError("x" * 20_000_000)),
    "prints": lambda x, axis: (print("garbage " * 1000), print("more", file=sys.stderr),
                               lmspec.softmax(x, axis))[2],
}


class Hostile:
    device, dtypes = "cpu", ("float32", "float64")

    def __init__(self, behaviour: str):
        self.name = f"hostile-{behaviour}"
        self._fn = BEHAVIOURS[behaviour]

    def softmax(self, x, axis=-1):
        return self._fn(x, axis)

    def log_softmax(self, x, axis=-1):
        return lmspec.log_softmax(x, axis)


class HangsInAvailable(Hostile):
    def __init__(self) -> None:
        super().__init__("raises")
        self.name = "hostile-hang-available"

    def available(self):
        time.sleep(3600)


class Squatter(Hostile):
    """Claims a built-in name."""

    def __init__(self) -> None:
        super().__init__("nan")
        self.name = "torch-cpu"


class NewlineName(Hostile):
    def __init__(self) -> None:
        super().__init__("nan")
        self.name = "bad-name\n"


@lmspec.hookimpl
def register_backends(register):
    for b in BEHAVIOURS:
        register(Hostile(b))
    register(HangsInAvailable())
    register(Squatter())
    register(NewlineName())
