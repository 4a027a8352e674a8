"""Attacks on what a host says about its backends: the plugin patches the host it runs
in (it can: it is plugin code), so its descriptors and answers are whatever it likes.

``HOSTILE_NAMES`` picks the attack: ``names`` (names the host's own check would refuse),
``descriptors`` (malformed descriptors), ``available`` (malformed availability answers),
``precision`` (a declared working precision that is not an engine mode), ``big`` (16
backends with 200 KB of deviations each between them, all correct).
"""

from __future__ import annotations

import os
import re
import sys

import lmspec
from lmspec.backends import host as _host_module
from lmspec.backends import registry

# the host runs as ``python -m lmspec.backends.host``: the module that serves is __main__
host = sys.modules["__main__"] if hasattr(sys.modules["__main__"], "Host") else _host_module

from . import Base

MODE = os.environ.get("HOSTILE_NAMES", "names")

LOOKALIKES = ["t\u03bfrch-cpu", "Torch-CPU", "torch\u200b-cpu", "torch-cpu ", "j\u0430x-cpu",
              "caf\u00e9"]


class Named(Base):
    def attack(self, x, axis):
        return lmspec.softmax(x, axis)  # correct: only its name is wrong


class Correct(Base):
    def __init__(self, name: str, deviations: dict):
        super().__init__(name)
        self.deviations = deviations

    def attack(self, x, axis):
        return lmspec.softmax(x, axis)


if MODE == "names":
    registry.NAME_RE = re.compile(r".*", re.S)  # the host's check now accepts anything
    registry.BUILTIN_NAMES = ()

if MODE == "descriptors":
    _real = host._descriptor
    _BAD = [
        lambda d: ["not", "a", "dict"],
        lambda d: {**d, "dtypes": "float64"},
        lambda d: {**d, "name": 12345},
        lambda d: {**d, "implements": ["softmax", "rm -rf"]},
        lambda d: {**d, "deviations": {"softmax": "everything"}},
    ]
    _count = iter(range(len(_BAD)))

    def _bad_descriptor(entry):
        return _BAD[next(_count) % len(_BAD)](_real(entry))

    host._descriptor = _bad_descriptor

if MODE == "available":
    _ANSWERS = iter([(1, 2, 3), "yes", None, (True,), ("no", 5)])
    _real_available = host.Host.available

    def _available(self, name):
        return next(_ANSWERS, (True, ""))

    host.Host.available = _available


@lmspec.hookimpl
def register_backends(register):
    if MODE == "names":
        for n in LOOKALIKES:
            register(Named(n))
    elif MODE in ("descriptors", "available"):
        for i in range(5):
            register(Named(f"hostile-{MODE}-{i}"))
    elif MODE == "precision":
        b = Named("hostile-precision")
        b.precision = {"float64": "bfloat16"}
        register(b)
    elif MODE == "big":
        for i in range(16):
            devs = {f"softmax/never{j}": lmspec.Deviation("r" * 1900, applies=lambda a, k: False)
                    for j in range(7)}
            register(Correct(f"hostile-big-{i:02d}", devs))
