"""The Backend protocol (CONTRACT §3), for type checkers and plugin authors.

Only ``name``, ``device`` and ``dtypes`` are required; op methods carry the catalogue
signatures (``backend.softmax(x, axis=-1)``); a missing method means "unsupported".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    name: str
    device: str
    dtypes: tuple[str, ...]


class SupportsVjp(Protocol):
    def vjp(self, op: str, args: Sequence[Any], kwargs: Mapping[str, Any],
            cotangent: Any) -> tuple[Any, ...]: ...


class SupportsInfo(Protocol):
    def info(self) -> dict[str, Any]: ...


class SupportsAvailable(Protocol):
    def available(self) -> tuple[bool, str]: ...


@dataclass(frozen=True)
class Deviation:
    """A documented, narrow difference between a backend and the spec (CONTRACT §3).

    A backend's ``deviations`` maps a key — ``"op"``, ``"op/check"`` or
    ``"op/check/dtype"`` (the narrowest key that matches wins) — to the reason as a
    string, or to a ``Deviation`` whose ``applies(args, kwargs)`` says which examples
    it covers (``args``/``kwargs`` exactly as the op received them). A mismatch on an
    example the deviation covers is counted as ``deviation`` and the search goes on;
    a mismatch on any other example of the same check is still a ``fail``.
    """

    reason: str
    applies: Callable[[Sequence[Any], Mapping[str, Any]], bool] | None = None
