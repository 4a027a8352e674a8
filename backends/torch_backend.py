"""A generic PyTorch backend: NumPy in, torch's own kernels, NumPy out.

Each family module ``lmspec.backends.torch_<family>`` defines functions named after
catalogue ops that take and return torch tensors (with the catalogue's signature) and
call torch's own implementations. :class:`TorchBackend` exposes them as backend
methods, converting arrays at the boundary, and derives every ``vjp`` from torch
autograd. torch is imported on first use, never at plugin import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from functools import cached_property
from typing import Any

import numpy as np

import lmspec
from lmspec._precision import DTYPES
from lmspec.backends.engine_ops import EngineOps, declared_deviations
from lmspec.sampling import SAMPLERS

_DEVICE: ContextVar[str] = ContextVar("lmspec_torch_device", default="cpu")


def device() -> str:
    """The torch device of the backend call in progress (for ops with no tensor input)."""
    return _DEVICE.get()


def torch_dtype(name: str):
    """The torch dtype of a contract dtype name (``"float32"`` → ``torch.float32``)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def to_torch(x: Any, dev: str) -> Any:
    """NumPy arrays (tuples of them) → tensors on ``dev``; everything else unchanged."""
    import torch

    if isinstance(x, (tuple, list)):
        return tuple(to_torch(a, dev) for a in x)
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x).reshape(x.shape)  # ascontiguousarray makes 0-d arrays 1-d
        if x.dtype == DTYPES["bfloat16"]:
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).to(dev)
        return torch.from_numpy(x).to(dev)
    return x


def to_numpy(x: Any) -> Any:
    """Tensors (tuples of them) → NumPy (bfloat16 widened to float32, exactly)."""
    import torch

    if isinstance(x, (tuple, list)):
        return tuple(to_numpy(a) for a in x)
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return x


def _flat(x: Any) -> list[Any]:
    return [b for a in x for b in _flat(a)] if isinstance(x, (tuple, list)) else [x]


class TorchBackend(EngineOps):
    EXTRA_OPS = frozenset(SAMPLERS)

    """A backend running torch's kernels on one device (``cpu``, ``cuda:0`` …).

    Public base class for plugins: a subclass sets :attr:`kernels` to replace some ops
    by its own torch functions and inherits every other op, the NumPy↔torch conversion
    and the gradients (``vjp`` by autograd through whichever kernel runs the op).
    """

    kernels: Mapping[str, Callable[..., Any]] = {}
    """Op name → torch function (tensors in, tensors out, the catalogue's signature) that
    replaces the built-in kernel of that op; its documented deviations are dropped."""

    def __init__(self, name: str, device: str, dtypes: Sequence[str], *, tf32: bool = False):
        self.name = name
        self.device = device
        self.dtypes = tuple(dtypes)
        self.tf32 = tf32
        if tf32:  # float32 products in TF32: judged with TF32's unit roundoff
            self.precision = {"float32": "tf32"}

    # -- discovery ---------------------------------------------------------------
    @cached_property
    def _torch(self) -> Any:
        """torch, configured once: on the CPU, ``LMSPEC_TORCH_THREADS`` intra-op threads
        (default 1). Conformance inputs are tiny, where extra threads only add
        synchronisation (an LSTM step costs 100× more with 2 threads on 2 cores) and
        oversubscribe parallel workers; the count used is recorded in ``info()``."""
        import torch

        if self.device == "cpu":
            torch.set_num_threads(int(os.environ.get("LMSPEC_TORCH_THREADS", "1")))
        else:  # the math mode is explicit: cuDNN allows TF32 by default, matmuls do not
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
        return torch

    @cached_property
    def _impls(self) -> dict[str, Callable[..., Any]]:
        impls: dict[str, Callable[..., Any]] = {}
        for fam in lmspec.FAMILIES:
            mod = importlib.import_module(f"lmspec.backends.torch_{fam}")
            impls.update({op: getattr(mod, op) for op, d in lmspec.OPS.items()
                          if d.family == fam and callable(getattr(mod, op, None))})
        sampling = importlib.import_module("lmspec.backends.torch_sampling")
        impls.update({m: getattr(sampling, m) for m in SAMPLERS  # sampler methods (§2)
                      if callable(getattr(sampling, m, None))})
        return {**impls, **self.kernels}

    @cached_property
    def deviations(self) -> dict[str, str]:  # type: ignore[override]
        if importlib.util.find_spec("torch") is None:  # unavailable: nothing to declare
            return {}
        out = declared_deviations((importlib.import_module(f"lmspec.backends.torch_{fam}")
                                   for fam in lmspec.FAMILIES), self.device)
        return {k: v for k, v in out.items() if k.split("/")[0] not in self.kernels}

    def _invoke(self, op: str, impl: Callable[..., Any], args: Sequence[Any],
                kwargs: Mapping[str, Any]) -> Any:
        return self._call(impl, args, kwargs)

    # -- protocol ----------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("torch") is None:
            return False, "torch is not installed (pip install 'lmspec[torch]')"
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, ""

    def info(self) -> dict[str, Any]:
        torch = self._torch

        info: dict[str, Any] = {
            "torch": torch.__version__,
            "device": self.device,
            "num_threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        }
        if self.device.startswith("cuda"):
            info.update(
                device_name=torch.cuda.get_device_name(self.device),
                capability=".".join(map(str, torch.cuda.get_device_capability(self.device))),
                cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(),
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                matmul_fp16_reduced_precision=torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
                matmul_bf16_reduced_precision=torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            )
        else:
            info["device_name"] = platform.processor() or platform.machine()
            info["build"] = {  # what explains last-digit differences between machines
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "mkl": torch.backends.mkl.is_available(),
                "mkldnn": torch.backends.mkldnn.is_available(),
                "openmp": torch.backends.openmp.is_available(),
                "interop_threads": torch.get_num_interop_threads(),
            }
        for fam in lmspec.FAMILIES:
            mod = importlib.import_module(f"lmspec.backends.torch_{fam}")
            notes = getattr(mod, "NOTES", None)
            if notes:
                info.setdefault("notes", {}).update(notes)
        return info

    def _kw(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments with any arrays among them moved to the device too."""
        return {k: to_torch(v, self.device) for k, v in kwargs.items()}

    def _call(self, impl: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]):
        torch = self._torch

        token = _DEVICE.set(self.device)
        try:
            with torch.no_grad():
                return to_numpy(impl(*to_torch(args, self.device), **self._kw(kwargs)))
        finally:
            _DEVICE.reset(token)

    def vjp(self, op: str, args: Sequence[Any], kwargs: Mapping[str, Any], cotangent: Any):
        """The gradient by torch autograd through the same kernels as the forward."""
        torch = self._torch

        d = lmspec.OPS[op]
        impl = self._impls.get(op)
        if impl is None or not d.diff:
            raise NotImplementedError(f"{self.name}: no vjp for {op}")
        targs = list(to_torch(args, self.device))
        leaves: list[list[torch.Tensor]] = []
        for i, a in enumerate(targs):
            members = list(a) if isinstance(a, tuple) else [a]
            wanted = d.params[i] in d.diff
            members = [m.detach().requires_grad_(True)
                       if wanted and isinstance(m, torch.Tensor) and m.is_floating_point() else m
                       for m in members]
            targs[i] = tuple(members) if isinstance(a, tuple) else members[0]
            leaves.append([m for m in members if isinstance(m, torch.Tensor) and m.requires_grad])
        token = _DEVICE.set(self.device)
        try:
            with torch.enable_grad():
                out = impl(*targs, **self._kw(kwargs))
        finally:
            _DEVICE.reset(token)
        outs = _flat(out)
        cots = [torch.as_tensor(to_torch(np.asarray(c), self.device)) for c in _flat(cotangent)]
        pairs = [(o, c.to(o.dtype).reshape(o.shape)) for o, c in zip(outs, cots)
                 if isinstance(o, torch.Tensor) and o.requires_grad]
        flat_leaves = [t for group in leaves for t in group]
        grads = (torch.autograd.grad([o for o, _ in pairs], flat_leaves, [c for _, c in pairs],
                                     allow_unused=True) if pairs and flat_leaves else
                 [None] * len(flat_leaves))
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(flat_leaves, grads)]
        it = iter(to_numpy(tuple(grads)))
        result: list[Any] = []
        for a, group in zip(targs, leaves):
            if not group:
                result.append(None)
            elif isinstance(a, tuple):
                result.append(tuple(next(it) for _ in group))
            else:
                result.append(next(it))
        return tuple(result)
