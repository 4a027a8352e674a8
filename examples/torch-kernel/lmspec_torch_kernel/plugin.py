"""The lmspec plugin: torch-cpu with the hand-written softmax.

``TorchBackend`` (lmspec's public base class) runs every op on torch's own kernels;
``kernels`` replaces some of them. The gradient of a replaced op is autograd through the
replacement, so the ``vjp`` check tests the custom kernel's backward too. Importing this
module imports no torch.
"""

import lmspec
from lmspec.backends.torch_backend import TorchBackend

from .kernels import softmax


class KernelBackend(TorchBackend):
    """torch on one device, with this package's softmax."""

    kernels = {"softmax": softmax}


@lmspec.hookimpl
def register_backends(register):
    register(KernelBackend("torch-kernel-cpu", "cpu",
                           ("float16", "bfloat16", "float32", "float64")))
