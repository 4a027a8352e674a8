"""A generic JAX backend: NumPy in, JAX's own library functions under ``jax.jit``, NumPy out.

Each family module ``lmspec.backends.jax_<family>`` defines functions named after
catalogue ops that take and return jax arrays (with the catalogue's signature) and call
JAX's own implementations (``jax.nn``, ``jax.scipy.special``, ``jax.lax``). A family with
no such module is simply not offered (an op JAX has no kernel for is ``unsupported``).
:class:`JaxBackend` exposes the functions as backend methods: each call is compiled with
``jax.jit`` for its non-array arguments (see :func:`_split`) and every ``vjp`` is
``jax.vjp`` through the same function, compiled too. Arrays are converted only at the
boundary.

jax is imported on first use, never at plugin import, and configured then: 64-bit types
on (``jax_enable_x64``, which the float64 checks need), and XLA's persistent compilation
cache in a user cache directory (``LMSPEC_JAX_CACHE_DIR``, default
``$XDG_CACHE_HOME/lmspec/jax``), since XLA compiles once per input shape and a conformance
run draws many small shapes. There is no shape bucketing: padding a batch or sequence axis
to a shared size can change which dot emitter XLA picks, and so the summation order and the
rounding, so it could move a verdict; every example runs at its own shape, and caching
changes how long a run takes, never a result.
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

import lmspec
from lmspec._precision import DTYPES
from lmspec.backends.engine_ops import EngineOps, declared_deviations
from lmspec.sampling import SAMPLERS

_CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin")
_OPS_KEPT = 3
_MAPS_CHECK_EVERY = 64
"""Calls between two looks at the process's memory-map count (Linux)."""


def _map_counts() -> tuple[int, int] | None:
    """``(mappings of this process, vm.max_map_count)``, or None where /proc has neither.
    XLA on the CPU maps each loaded executable's code in several mappings of its own, so a
    process that keeps thousands alive reaches the kernel's limit (65530 by default); LLVM
    then reports "Cannot allocate memory" and XLA dies of SIGSEGV instead of raising."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f), limit
    except (OSError, ValueError):
        return None


class _Leaf:
    """Placeholder for the ``i``-th traced value in a call's static template."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Leaf) and other.i == self.i

    def __hash__(self) -> int:
        return hash(("_Leaf", self.i))

    def __repr__(self) -> str:
        return f"_Leaf({self.i})"


def _split(values: Any, name: str, static: frozenset[str], dynamic: frozenset[str],
           leaves: list[Any]) -> Any:
    """``values`` with every array (and every scalar JAX may trace) replaced by a
    :class:`_Leaf` appended to ``leaves``; what is left is hashable and keys the compiled
    function. Floats are traced (as weakly typed scalars: they never promote the dtype
    under test), so a new temperature or ``eps`` does not recompile; ints, bools, strings
    and ``None`` are static (shapes, options), except the names in ``dynamic``; the names
    in ``static`` are always static (Python control flow needs them)."""
    if isinstance(values, (tuple, list)):
        return tuple(_split(v, name, static, dynamic, leaves) for v in values)
    if isinstance(values, np.ndarray) or (
            name not in static and (isinstance(values, (float, np.floating)) or (
                name in dynamic and isinstance(values, (int, np.integer))
                and not isinstance(values, bool)))):
        leaves.append(values.item() if isinstance(values, np.generic) else values)
        return _Leaf(len(leaves) - 1)
    if isinstance(values, np.generic):
        return values.item()
    return values


def _fill(template: Any, leaves: Sequence[Any]) -> Any:
    if isinstance(template, _Leaf):
        return leaves[template.i]
    if isinstance(template, tuple):
        return tuple(_fill(t, leaves) for t in template)
    return template


def _leaf_ids(template: Any) -> list[int]:
    if isinstance(template, _Leaf):
        return [template.i]
    if isinstance(template, tuple):
        return [i for t in template for i in _leaf_ids(t)]
    return []


def _flat(x: Any) -> list[Any]:
    return [b for a in x for b in _flat(a)] if isinstance(x, (tuple, list)) else [x]


def to_numpy(x: Any) -> Any:
    """jax arrays (tuples of them) → NumPy; bfloat16 widened to float32 (exactly)."""
    if isinstance(x, (tuple, list)):
        return tuple(to_numpy(a) for a in x)
    if x is None or isinstance(x, (int, float, bool)):
        return x
    a = np.asarray(x)
    return a.astype(np.float32) if a.dtype == DTYPES["bfloat16"] else a


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return os.environ.get("LMSPEC_JAX_CACHE_DIR") or str(Path(base) / "lmspec" / "jax")


def _nvidia_device_node() -> bool:
    """An NVIDIA driver is loaded (checked without loading anything CUDA-specific)."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def _family_module(family: str) -> Any | None:
    """``lmspec.backends.jax_<family>``, or ``None`` when there is no such module."""
    name = f"lmspec.backends.jax_{family}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


class JaxBackend(EngineOps):
    """A backend running JAX's functions, compiled by XLA, on one device (``cpu``,
    ``cuda:0`` …)."""

    def __init__(self, name: str, device: str, dtypes: Sequence[str]):
        self.name = name
        self.device = device
        self.dtypes = tuple(dtypes)
        self._compiled: dict[Any, Callable[..., Any]] = {}
        self._recent_ops: list[str] = []
        self._calls = 0

    # -- discovery ---------------------------------------------------------------
    @cached_property
    def _jax(self) -> Any:
        """jax, configured once: x64 on, the persistent compilation cache (unless the user
        set one), and on a machine with no NVIDIA driver only the CPU platform (so that an
        installed CUDA plugin is not initialised for nothing)."""
        if (self.device == "cpu" and "JAX_PLATFORMS" not in os.environ
                and not _nvidia_device_node() and "jax" not in sys.modules):
            os.environ["JAX_PLATFORMS"] = "cpu"
        import jax

        jax.config.update("jax_enable_x64", True)
        if not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", _cache_dir())
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        return jax

    @cached_property
    def _jax_device(self) -> Any:
        kind, _, index = self.device.partition(":")
        return self._jax.devices(kind)[int(index or 0)]

    @cached_property
    def _modules(self) -> dict[str, Any]:
        mods = {fam: _family_module(fam) for fam in lmspec.FAMILIES}
        return {fam: m for fam, m in mods.items() if m is not None}

    @cached_property
    def _impls(self) -> dict[str, Callable[..., Any]]:
        impls: dict[str, Callable[..., Any]] = {}
        for fam, mod in self._modules.items():
            impls.update({op: getattr(mod, op) for op, d in lmspec.OPS.items()
                          if d.family == fam and callable(getattr(mod, op, None))})
        return impls

    def _names(self, op: str, attr: str) -> frozenset[str]:
        mod = self._modules[lmspec.OPS[op].family]
        return frozenset(getattr(mod, attr, {}).get(op, ()))

    @cached_property
    def deviations(self) -> dict[str, Any]:  # type: ignore[override]
        if importlib.util.find_spec("jax") is None:  # unavailable: nothing to declare
            return {}
        return declared_deviations(self._modules.values(), self.device)

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op in SAMPLERS:  # draw_tokens, draw_speculative: jitted in jax_sampling (§2)
            mod = self._modules.get("sampling")
            if mod is None or not hasattr(mod, "sampler_backend"):
                raise AttributeError(f"{self.name} does not implement {op}")
            return getattr(mod.sampler_backend(self), op)
        return super().__getattr__(op)

    def _invoke(self, op: str, impl: Callable[..., Any], args: Sequence[Any],
                kwargs: Mapping[str, Any]) -> Any:
        return self._call(op, args, kwargs)

    # -- protocol ----------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("jax") is None:
            return False, "jax is not installed (pip install 'lmspec[jax]')"
        if self.device.startswith("cuda"):
            plugins = [p for p in _CUDA_PLUGINS if _installed(p)]
            if not plugins:
                return False, "jax's CUDA build is not installed (pip install 'jax[cuda12]')"
            if not _nvidia_device_node():
                return False, "no CUDA device"
            try:
                self._jax_device  # noqa: B018 - initialises the CUDA platform
            except (RuntimeError, IndexError) as exc:
                return False, f"no CUDA device for jax: {exc}"
        return True, ""

    def info(self) -> dict[str, Any]:
        jax = self._jax
        import jaxlib

        dev = self._jax_device
        info: dict[str, Any] = {
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "device": self.device,
            "device_kind": dev.device_kind, "platform_version": dev.client.platform_version,
            "jax_enable_x64": bool(jax.config.jax_enable_x64),
            "default_matmul_precision": jax.config.jax_default_matmul_precision,
            "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }
        if self.device == "cpu":
            info["device_name"] = platform.processor() or platform.machine()
        notes: dict[str, str] = {}
        for mod in self._modules.values():
            notes.update(getattr(mod, "NOTES", {}))
        if notes:
            info["notes"] = notes
        return info

    # -- calls -------------------------------------------------------------------
    def _template(self, op: str, args: Sequence[Any], kwargs: Mapping[str, Any]):
        static, dynamic = self._names(op, "STATIC"), self._names(op, "DYNAMIC")
        names = lmspec.OPS[op].params
        leaves: list[Any] = []
        targs = tuple(_split(a, names[i] if i < len(names) else "", static, dynamic, leaves)
                      for i, a in enumerate(args))
        tkw = tuple(sorted((k, _split(v, k, static, dynamic, leaves))
                           for k, v in kwargs.items()))
        return targs, tkw, leaves

    def _jitted(self, key: Any, make: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
        """The jitted function for ``key`` (``(op, mode, template…)``). Every shape leaves an
        executable in memory, and a whole conformance run in one process exhausted the
        kernel's memory mappings (see :func:`_map_counts`), so the in-memory caches are
        dropped once calls have moved through more than ``_OPS_KEPT`` ops, and whenever
        the process holds more than a third of the mappings allowed; the persistent cache
        keeps the programs."""
        if key[0] not in self._recent_ops:
            self._recent_ops.append(key[0])
            if len(self._recent_ops) > _OPS_KEPT:
                self._drop_executables()
                self._recent_ops = [key[0]]
        self._calls += 1
        if self._calls % _MAPS_CHECK_EVERY == 0:
            counts = _map_counts()
            if counts is not None and counts[0] > counts[1] // 3:
                self._drop_executables()
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = self._jax.jit(make())
        return fn

    def _drop_executables(self) -> None:
        self._compiled.clear()
        self._jax.clear_caches()
        gc.collect()

    @cached_property
    def _refusals(self) -> tuple[str, ...]:
        return tuple(r for mod in self._modules.values() for r in getattr(mod, "REFUSALS", ()))

    def _run(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the backend's device; an error whose message a family module
        lists in ``REFUSALS`` (XLA declining to compile a dtype or shape on this device) is
        the engine's refusal: ``NotImplementedError`` (unsupported), with its message."""
        try:
            with self._jax.default_device(self._jax_device):
                return to_numpy(fn(*args))
        except (ValueError, self._jax.errors.JaxRuntimeError) as exc:
            if any(r in str(exc) for r in self._refusals):
                raise NotImplementedError(f"{self.name} {op}: {str(exc)[:300]}") from exc
            raise

    def _call(self, op: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        impl = self._impls[op]
        targs, tkw, leaves = self._template(op, args, kwargs)

        def make() -> Callable[..., Any]:
            def run(values):
                return impl(*_fill(targs, values), **dict(_fill(tkw, values)))
            return run

        return self._run(op, self._jitted((op, "forward", targs, tkw), make), leaves)

    def vjp(self, op: str, args: Sequence[Any], kwargs: Mapping[str, Any], cotangent: Any):
        """The gradient by ``jax.vjp`` through the same function as the forward."""
        jax, d = self._jax, lmspec.OPS[op]
        impl = self._impls.get(op)
        if impl is None or not d.diff:
            raise NotImplementedError(f"{self.name}: no vjp for {op}")
        targs, tkw, leaves = self._template(op, args, kwargs)
        wrt = [[i for i in _leaf_ids(t) if np.asarray(leaves[i]).dtype.kind == "f"
                or np.asarray(leaves[i]).dtype == DTYPES["bfloat16"]]
               if i < len(d.params) and d.params[i] in d.diff else []
               for i, t in enumerate(targs)]
        wrt_ids = tuple(i for group in wrt for i in group)

        def make() -> Callable[..., Any]:
            jnp = jax.numpy

            def run(values, cots):
                def f(*diff_values):
                    merged = list(values)
                    for i, v in zip(wrt_ids, diff_values):
                        merged[i] = v
                    return impl(*_fill(targs, merged), **dict(_fill(tkw, merged)))

                out, pull = jax.vjp(f, *(values[i] for i in wrt_ids))
                outs, tree = jax.tree_util.tree_flatten(out)
                cts = [jnp.asarray(c).astype(o.dtype).reshape(o.shape)
                       for o, c in zip(outs, cots)]
                return pull(jax.tree_util.tree_unflatten(tree, cts))
            return run

        grads = self._run(op, self._jitted((op, "vjp", targs, tkw, wrt_ids), make), leaves,
                          [np.asarray(c) for c in _flat(cotangent)])
        by_leaf = dict(zip(wrt_ids, grads))
        result: list[Any] = []
        for a, group in zip(args, wrt):
            if not group:
                result.append(None)
            elif isinstance(a, (tuple, list)):
                result.append(tuple(by_leaf[i] for i in group))
            else:
                result.append(by_leaf[group[0]])
        return tuple(result)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
