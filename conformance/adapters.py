"""Adapters from framework callables to the catalogue's NumPy interface (``lmspec.adapters``).

:func:`lmspec.check` and :func:`lmspec.assert_conforms` call the function under test
with NumPy arrays (bfloat16 as ``ml_dtypes.bfloat16``) and expect NumPy back, exactly as
a backend method (CONTRACT §3). A kernel written for torch or JAX is wrapped once::

    lmspec.check("softmax", lmspec.adapters.torch(my_softmax), dtypes=["bfloat16"])

The wrapper converts every array argument (tuples of arrays too) to a tensor on the
device, calls the function and converts the result back (a bfloat16 tensor becomes
float32 exactly, which the harness accepts). It also carries the gradient in the
backend's calling convention, ``wrapper.vjp(op, args, kwargs, cotangent)``, taken by the
framework's own autodiff through the same function: torch autograd, ``jax.vjp``.
Nothing here imports torch or jax until a wrapper is made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

import lmspec

__all__ = ["torch", "jax", "Adapted"]


class Adapted:
    """A framework function as a NumPy callable with a ``vjp`` attribute."""

    def __init__(self, fn: Callable[..., Any], forward: Callable[..., Any],
                 vjp: Callable[[str, Sequence[Any], Mapping[str, Any], Any], tuple[Any, ...]]):
        self.fn = fn
        self._forward = forward
        self.vjp = vjp
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<lmspec adapter of {self.__name__}>"


def torch(fn: Callable[..., Any], device: str = "cpu") -> Adapted:
    """Wrap a torch function (tensors in, tensors out, the catalogue's signature).

    Forward: arrays → ``torch.from_numpy(...).to(device)`` (bfloat16 through its bits),
    run under ``torch.no_grad()``, tensors → NumPy. ``vjp``: autograd through ``fn``,
    one entry per positional argument — the gradient for each argument the catalogue
    lists as differentiable, ``None`` for the others (the machinery of
    :class:`lmspec.backends.torch_backend.TorchBackend`, with ``fn`` as the op's kernel).
    """
    from lmspec.backends.torch_backend import TorchBackend

    backends: dict[str, TorchBackend] = {}

    def backend_for(op: str) -> TorchBackend:
        if op not in backends:
            cls = type("TorchAdapter", (TorchBackend,), {"kernels": {op: fn}})
            backends[op] = cls(f"adapter-{op}", device, tuple(lmspec.DTYPES))
        return backends[op]

    plain = TorchBackend("adapter", device, tuple(lmspec.DTYPES))

    def forward(*args: Any, **kwargs: Any) -> Any:
        return plain._call(fn, args, kwargs)  # tensors in, no_grad, NumPy out

    def vjp(op: str, args: Sequence[Any], kwargs: Mapping[str, Any], cotangent: Any):
        return backend_for(op).vjp(op, args, kwargs, cotangent)

    return Adapted(fn, forward, vjp)


def _jax_module() -> Any:
    import jax as jax_mod

    jax_mod.config.update("jax_enable_x64", True)  # float64 checks need it
    return jax_mod


def _to_jax(x: Any, jnp: Any, device: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return tuple(_to_jax(a, jnp, device) for a in x)
    if isinstance(x, np.ndarray):
        import jax as jax_mod

        return jax_mod.device_put(jnp.asarray(x), device)
    return x


def _from_jax(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return tuple(_from_jax(a) for a in x)
    if x is None or isinstance(x, (int, float, str, bool)):
        return x
    return np.asarray(x)


def jax(fn: Callable[..., Any], device: str = "cpu") -> Adapted:
    """Wrap a JAX function (arrays in, arrays out, the catalogue's signature).

    Forward: arrays → ``jax.device_put`` on the first device of ``device``'s platform
    (``"cpu"``, ``"cuda"``/``"gpu"``), x64 enabled so float64 stays float64, results →
    NumPy (bfloat16 as ``ml_dtypes.bfloat16``). ``vjp``: ``jax.vjp`` of ``fn`` in its
    differentiable positional arguments (the catalogue's list), ``None`` for the rest.
    ``ImportError`` if jax is not installed.
    """
    jax_mod = _jax_module()
    jnp = jax_mod.numpy
    platform = device.split(":")[0].replace("cuda", "gpu")
    dev = jax_mod.devices(platform)[0]

    def forward(*args: Any, **kwargs: Any) -> Any:
        return _from_jax(fn(*_to_jax(tuple(args), jnp, dev),
                            **{k: _to_jax(v, jnp, dev) for k, v in kwargs.items()}))

    def vjp(op: str, args: Sequence[Any], kwargs: Mapping[str, Any], cotangent: Any):
        d = lmspec.OPS[op]
        jargs = list(_to_jax(tuple(args), jnp, dev))
        kw = {k: _to_jax(v, jnp, dev) for k, v in kwargs.items()}
        wanted = [i for i, a in enumerate(jargs)
                  if d.params[i] in d.diff and a is not None and _is_float(a)]
        if not wanted:
            return tuple(None for _ in jargs)

        def f(*diff: Any) -> Any:
            full = list(jargs)
            for i, v in zip(wanted, diff):
                full[i] = v
            return fn(*full, **kw)

        out, pull = jax_mod.vjp(f, *[jargs[i] for i in wanted])
        cot = jax_mod.tree_util.tree_map(
            lambda o, c: jnp.asarray(np.asarray(c), dtype=o.dtype).reshape(o.shape), out,
            _as_tree(out, cotangent))
        grads = dict(zip(wanted, pull(cot)))
        return tuple(_from_jax(grads[i]) if i in grads else None for i in range(len(jargs)))

    return Adapted(fn, forward, vjp)


def _is_float(a: Any) -> bool:
    if isinstance(a, tuple):
        return any(_is_float(m) for m in a)
    dt = str(getattr(a, "dtype", ""))
    return dt.startswith("float") or dt == "bfloat16"


def _as_tree(template: Any, cot: Any) -> Any:
    """The cotangent in the output's structure (tuples for tuple outputs)."""
    if isinstance(template, (tuple, list)):
        return tuple(_as_tree(t, c) for t, c in zip(template, cot))
    return cot
