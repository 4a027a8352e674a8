"""Built-in backends, registered through the ``lmspec`` entry point like any plugin.

Importing this module imports no torch: :class:`TorchBackend` imports it on first use.
"""

import lmspec
from lmspec.backends.torch_backend import TorchBackend


@lmspec.hookimpl
def register_backends(register):
    register(TorchBackend("torch-cpu", "cpu", ("float16", "bfloat16", "float32", "float64")))
    register(TorchBackend("torch-cuda", "cuda:0", ("float16", "bfloat16", "float32", "float64")))
