"""The one hook of the ``lmspec`` plugin interface (CONTRACT §3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmspec._plugin import hookspec


class BackendSpec:
    @hookspec
    def register_backends(self, register: Callable[[Any], None]) -> None:
        """Call ``register(backend)`` once for each backend this plugin provides.

        Must be cheap: construct backend objects, do not import torch/CUDA here.
        """
