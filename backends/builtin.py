"""Built-in backends, registered through the ``lmspec`` entry point like any plugin.

Importing this module imports no torch, no onnxruntime, no jax and no transformers: each
backend imports its engine on first use.
"""

import lmspec
from lmspec.backends.jax_backend import JaxBackend
from lmspec.backends.onnxruntime_backend import OrtBackend
from lmspec.backends.torch_backend import TorchBackend
from lmspec.backends.transformers_backend import TransformersBackend


@lmspec.hookimpl
def register_backends(register):
    register(TorchBackend("torch-cpu", "cpu", ("float16", "bfloat16", "float32", "float64")))
    register(TorchBackend("torch-cuda", "cuda:0", ("float16", "bfloat16", "float32", "float64")))
    register(TorchBackend("torch-cuda-tf32", "cuda:0", ("float32",), tf32=True))
    register(OrtBackend("onnxruntime-cpu", "cpu", ("float16", "bfloat16", "float32", "float64")))
    register(OrtBackend("onnxruntime-cuda", "cuda:0", ("float16", "bfloat16", "float32", "float64"),
                        provider="CUDAExecutionProvider"))
    register(JaxBackend("jax-cpu", "cpu", ("float16", "bfloat16", "float32", "float64")))
    register(JaxBackend("jax-cuda", "cuda:0", ("float16", "bfloat16", "float32", "float64")))
    register(TransformersBackend("transformers-cpu", "cpu"))
