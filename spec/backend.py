"""The Backend protocol (CONTRACT §3), for type checkers and plugin authors.

Only ``name``, ``device`` and ``dtypes`` are required; op methods carry the catalogue
signatures (``backend.softmax(x, axis=-1)``); a missing method means "unsupported".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
