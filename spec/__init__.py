"""lmspec: a property-tested reference specification of language-model math.

``import lmspec`` is the reference itself: every catalogue op is a float64 NumPy
function with the contract's signature (``lmspec.softmax(x)``), ``lmspec.vjp`` gives
its reference gradient, ``lmspec.OPS`` lists the catalogue, and ``lmspec.hookimpl``
marks a plugin's ``register_backends`` hook. Importing it never imports torch.
"""

from importlib import import_module

from ._catalogue import FAMILIES, OPS, OpDef
from ._plugin import hookimpl
from ._precision import DTYPES, computing_in
from ._vjp import vjp
from .backend import Backend, Deviation

for _family in FAMILIES:  # declares the ops, in catalogue order
    import_module(f"{__name__}.{_family}")

__version__ = "0.1.0"
SPEC_VERSION = "0.1.0"
"""Version of the specification (catalogue + semantics) that reports cite."""


_LAZY = {"check": "api", "assert_conforms": "api", "assert_close": "api"}
"""Public names of the conformance API, imported on first use (``import lmspec`` stays
cheap: no Hypothesis, no torch)."""


def __getattr__(name: str):
    if name in OPS:
        return OPS[name].reference
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.conformance.{_LAZY[name]}"), name)
    if name == "adapters":
        return import_module(f"{__name__}.conformance.adapters")
    raise AttributeError(f"module 'lmspec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(OPS) | set(_LAZY) | {"adapters"})


__all__ = ["FAMILIES", "OPS", "DTYPES", "Backend", "Deviation", "OpDef", "SPEC_VERSION",
           "computing_in", "hookimpl", "vjp", *OPS]
