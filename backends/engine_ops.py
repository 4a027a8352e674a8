"""What the built-in engine backends (torch, JAX, ONNX Runtime) share: the catalogue's ops
as methods, each dispatched to the engine module that implements it, and the deviations
those modules declare."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lmspec
from lmspec.backends.declared import merged, with_broader_predicates


def declared_deviations(modules: Iterable[Any], where: str) -> dict[str, Any]:
    """The ``DEVIATIONS`` of each engine module, a dict or a function of ``where`` (the
    device or execution provider: most are measured on one of them), a key declared by
    two modules holding both (:func:`~lmspec.backends.declared.merged`), every narrower
    key also holding the predicates of the broader keys it shadows, across modules
    (:func:`~lmspec.backends.declared.with_broader_predicates`: else jax-cpu's float16
    bound on ``softmax/vjp`` hid its one-element-axis NaN predicate on ``softmax``)."""
    groups = []
    for mod in modules:
        devs = getattr(mod, "DEVIATIONS", {})
        groups.append(devs(where) if callable(devs) else devs)
    return with_broader_predicates(merged(*groups))


class EngineOps:
    """``backend.softmax(...)`` for every op in :attr:`_impls` (and the extra names in
    :attr:`EXTRA_OPS`), calling :meth:`_invoke`; an op of the catalogue the engine does
    not implement is an ``AttributeError`` naming the backend."""

    name: str
    EXTRA_OPS: frozenset[str] = frozenset()
    _impls: Mapping[str, Callable[..., Any]]

    def _invoke(self, op: str, impl: Callable[..., Any], args: Sequence[Any],
                kwargs: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op.startswith("_") or (op not in lmspec.OPS and op not in self.EXTRA_OPS):
            raise AttributeError(op)
        impl = self._impls.get(op)
        if impl is None:
            raise AttributeError(f"{self.name} does not implement {op}")

        def method(*args: Any, **kwargs: Any) -> Any:
            return self._invoke(op, impl, args, kwargs)

        method.__name__ = op
        method.__doc__ = impl.__doc__
        return method

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._impls))
