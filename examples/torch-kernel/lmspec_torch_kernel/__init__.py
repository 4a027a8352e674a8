"""A hand-written torch softmax, checked against lmspec (see ``plugin`` and ``kernels``)."""

__version__ = "0.1.0"
