"""An ONNX Runtime backend: one small ONNX graph per op and option set, run by an
``onnxruntime.InferenceSession`` on one execution provider.

Each family module ``lmspec.backends.ort_<family>`` defines functions named after
catalogue ops, ``op(rt, *args, **kwargs)``, that describe the op as an ONNX graph built
with :class:`GraphBuilder` and run it with :meth:`Runtime.run`. Graphs are built once per
(op, options, input dtypes and ranks) and their sessions cached.

What is tested is the runtime's own kernels, so nothing is emulated:

- a graph the provider has no kernel for (``NOT_IMPLEMENTED`` at session creation) is
  ``NotImplementedError`` (status unsupported);
- where ONNX Runtime would run a node in another dtype — its ``InsertCastTransformer``
  wraps a float16 node that has no float16 kernel in Casts to float32 — the graph is
  refused the same way: the dtype under test is never silently widened. The check reads
  the optimized graph the session writes out and compares its Cast nodes with ours.

There is no ``vjp``: the inference runtime has no gradients. onnxruntime and onnx are
imported on first use, never at plugin import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import tempfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np

import lmspec
from lmspec._precision import DTYPES
from lmspec.backends.engine_ops import EngineOps, declared_deviations

_NOT_YET = re.compile(r"\w+ operator does not support \w+ yet")
_SCHEMA_TYPE = re.compile(r"Type Error: Type '[^']+' of input parameter \(\w+\) of operator "
                          r"\((\w+)\)")
OPSET = 23  # the ONNX default domain opset of every graph (Attention, RMSNormalization …)
MS_OPSET = 1  # com.microsoft

# ONNX TensorProto element types (numbers fixed by onnx.proto; no onnx import needed).
_ELEM = {"float32": 1, "int64": 7, "bool": 9, "float16": 10, "float64": 11, "bfloat16": 16}


def elem_type(a: np.ndarray | str) -> int:
    """The ONNX element type of an array (or of a contract dtype name)."""
    name = a if isinstance(a, str) else (
        "bfloat16" if a.dtype == DTYPES["bfloat16"] else a.dtype.name)
    if name not in _ELEM:
        raise ValueError(f"no ONNX element type for dtype {name!r}")
    return _ELEM[name]


def float_dtype(*arrays: Any) -> str:
    """The contract dtype name of the first float array among ``arrays``."""
    for a in arrays:
        if isinstance(a, np.ndarray) and (a.dtype.kind == "f" or a.dtype == DTYPES["bfloat16"]):
            return "bfloat16" if a.dtype == DTYPES["bfloat16"] else a.dtype.name
    raise ValueError("no float array among the inputs")


class GraphBuilder:
    """Collects the nodes and constants of one graph; values are named automatically.

    ``b.op("Softmax", x, axis=1)`` adds a node and returns its output name (a tuple of
    names with ``outputs=k``); ``b.const(value, dtype)`` adds an initializer; an input
    named ``""`` is an omitted optional input.
    """

    def __init__(self, inputs: Sequence[tuple[str, int, int]], float_type: str):
        self.inputs = list(inputs)  # (name, ONNX element type, rank)
        self.float_type = float_type
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.domains: set[str] = set()
        self._n = 0

    def _name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "",
           **attrs: Any) -> Any:
        from onnx import helper

        outs = [self._name(op_type.lower()) for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain or None,
                                           **attrs))
        if domain:
            self.domains.add(domain)
        return outs[0] if outputs == 1 else tuple(outs)

    def const(self, value: Any, dtype: str | None = None) -> str:
        """An initializer: ``dtype`` ``None`` = the float dtype under test; ``"int64"``,
        ``"bool"`` or a float name otherwise."""
        from onnx import numpy_helper

        dt = dtype or self.float_type
        arr = np.asarray(value, dtype=DTYPES.get(dt, dt))
        name = self._name("const")
        if dt == "bfloat16":
            from onnx import helper

            t = helper.make_tensor(name, _ELEM[dt], arr.shape,
                                   np.ascontiguousarray(arr).view(np.uint16).tobytes(), raw=True)
        else:
            t = numpy_helper.from_array(arr, name)
        self.initializers.append(t)
        return name

    def ints(self, *values: int) -> str:
        """A 1-d int64 constant (axes, shapes, permutations as inputs)."""
        return self.const(list(values), "int64")

    def model(self, outputs: Sequence[str], out_type: str | None = None) -> Any:
        from onnx import helper

        ins = [helper.make_tensor_value_info(n, t, [None] * r) for n, t, r in self.inputs]
        et = _ELEM[out_type or self.float_type]
        outs = [helper.make_tensor_value_info(n, et, None) for n in outputs]
        graph = helper.make_graph(self.nodes, "lmspec", ins, outs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET)] + [
            helper.make_opsetid(d, MS_OPSET) for d in sorted(self.domains)]
        m = helper.make_model(graph, opset_imports=opsets, producer_name="lmspec")
        m.ir_version = 10
        return m


Build = Callable[[GraphBuilder, list[str]], Any]


class Runtime:
    """Sessions on one execution provider, cached by (key, input dtypes and ranks)."""

    def __init__(self, providers: Sequence[str], threads: int):
        self.providers = list(providers)
        self.threads = threads
        self._cache: dict[Hashable, Any] = {}

    @cached_property
    def ort(self) -> Any:
        import onnxruntime

        return onnxruntime

    def _options(self, path: str) -> Any:
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 4  # errors reach the caller as exceptions
        so.optimized_model_filepath = path
        if self.providers[0] != "CPUExecutionProvider":
            # a node the device has no kernel for must not run on the CPU instead
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return so

    def _session(self, key: Hashable, model: Any, dtype: str) -> Any:
        import onnx

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "optimized.onnx")
            try:
                sess = self.ort.InferenceSession(model.SerializeToString(), self._options(path),
                                                 providers=self.providers)
            except Exception as exc:  # noqa: BLE001 - the runtime's own refusal, classified
                msg = str(exc)
                if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg:
                    raise NotImplementedError(
                        f"onnxruntime {self.ort.__version__} ({self.providers[0]}) has no "
                        f"kernel: {msg.split(':', 3)[-1].strip()}") from None
                if _SCHEMA_TYPE.search(msg):  # the ONNX operator itself excludes the dtype
                    raise NotImplementedError(
                        f"the ONNX operator does not take {dtype}: "
                        f"{_SCHEMA_TYPE.search(msg).group(0)}") from None
                raise
            optimized = onnx.load(path, load_external_data=False)
        widened = _inserted_casts(model.graph, optimized.graph)
        if widened:
            raise NotImplementedError(
                f"onnxruntime {self.ort.__version__} ({self.providers[0]}) has no {dtype} "
                f"kernel for {', '.join(sorted(widened))}: it would insert Casts and compute "
                "in another dtype")
        return sess

    def run(self, key: Hashable, feeds: Sequence[tuple[str, np.ndarray]], build: Build,
            dtype: str | None = None) -> list[np.ndarray]:
        """Run the graph ``build(b, input_names) -> output name(s)`` on ``feeds``.

        ``key`` names the op and every option that changes the graph; input dtypes and
        ranks are added to it. ``dtype`` is the float dtype of the graph's outputs and
        constants (default: that of the first float feed).
        """
        ft = dtype or float_dtype(*(a for _, a in feeds))
        full = (key, ft, tuple((n, elem_type(a), a.ndim) for n, a in feeds))
        entry = self._cache.get(full)
        if entry is None:
            b = GraphBuilder([(n, elem_type(a), a.ndim) for n, a in feeds], ft)
            outs = build(b, [n for n, _ in feeds])
            outs = [outs] if isinstance(outs, str) else list(outs)
            # graph outputs need names of their own (an input may not be an output);
            # bfloat16 results are widened to float32 (exact) at the very end, as NumPy
            # cannot receive a bfloat16 tensor from ONNX Runtime
            final = [b.op("Cast", o, to=_ELEM["float32"]) if ft == "bfloat16" else
                     b.op("Identity", o) for o in outs]
            try:
                out_type = "float32" if ft == "bfloat16" else None
                entry = self._session(full, b.model(final, out_type), ft)
            except NotImplementedError as exc:
                entry = exc
            self._cache[full] = entry
        if isinstance(entry, NotImplementedError):
            raise NotImplementedError(str(entry))
        return self._execute(entry, feeds)

    def _execute(self, sess: Any, feeds: Sequence[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        try:
            return self._execute_raw(sess, feeds)
        except Exception as exc:  # noqa: BLE001 - a kernel's own "not implemented", classified
            # e.g. the LSTM and GRU kernels are registered for double but throw
            # "LSTM operator does not support double yet" when run
            if _NOT_YET.search(str(exc)):
                raise NotImplementedError(
                    f"onnxruntime {self.ort.__version__} ({self.providers[0]}): "
                    f"{_NOT_YET.search(str(exc)).group(0)}") from None
            raise

    def _execute_raw(self, sess: Any,
                     feeds: Sequence[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        if not any(a.dtype == DTYPES["bfloat16"] for _, a in feeds):
            return sess.run(None, {n: np.ascontiguousarray(a) for n, a in feeds})
        values = {n: (self.ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(a).view(np.uint16), _ELEM["bfloat16"])
            if a.dtype == DTYPES["bfloat16"] else self.ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(a))) for n, a in feeds}
        outs = sess.run_with_ort_values(None, values)
        return [o.numpy().view(DTYPES["bfloat16"]) if o.data_type() == "tensor(bfloat16)"
                else o.numpy() for o in outs]


def _inserted_casts(ours: Any, optimized: Any) -> set[str]:
    """Op types of the nodes ONNX Runtime fed through Casts it inserted to run them in
    another dtype (``InsertCastTransformer`` names them ``InsertedPrecisionFreeCast_*``)."""
    casts = [n for n in optimized.node if n.op_type == "Cast" and n.name.startswith("Inserted")]
    if not casts:
        return set()
    cast_outs = {o for n in casts for o in n.output}
    return {n.op_type for n in optimized.node
            if n.op_type != "Cast" and any(i in cast_outs for i in n.input)} or {"?"}


class OrtBackend(EngineOps):
    """A backend running ONNX Runtime's kernels on one execution provider."""

    def __init__(self, name: str, device: str, dtypes: Sequence[str],
                 provider: str = "CPUExecutionProvider"):
        self.name = name
        self.device = device
        self.dtypes = tuple(dtypes)
        self.provider = provider

    @staticmethod
    def _modules() -> list[Any]:
        mods = []
        for fam in lmspec.FAMILIES:
            try:
                mods.append(importlib.import_module(f"lmspec.backends.ort_{fam}"))
            except ModuleNotFoundError as exc:
                if exc.name != f"lmspec.backends.ort_{fam}":
                    raise
        return mods

    @cached_property
    def _rt(self) -> Runtime:
        return Runtime([self.provider], int(os.environ.get("LMSPEC_ORT_THREADS", "1")))

    @cached_property
    def _impls(self) -> dict[str, Callable[..., Any]]:
        return {op: getattr(mod, op) for mod in self._modules() for op in lmspec.OPS
                if callable(getattr(mod, op, None))}

    @cached_property
    def deviations(self) -> dict[str, Any]:
        if importlib.util.find_spec("onnxruntime") is None:  # unavailable: nothing to declare
            return {}
        return declared_deviations(self._modules(), self.provider)

    def _invoke(self, op: str, impl: Callable[..., Any], args: Sequence[Any],
                kwargs: Mapping[str, Any]) -> Any:
        return impl(self._rt, *args, **kwargs)

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime
        except ImportError:
            return False, "onnxruntime is not installed (pip install 'lmspec[onnxruntime]')"
        if self.provider not in onnxruntime.get_available_providers():
            return False, f"onnxruntime {onnxruntime.__version__} has no {self.provider}"
        if self.provider != "CPUExecutionProvider":
            return _provider_works(self.provider)
        return True, ""

    def info(self) -> dict[str, Any]:
        ort = self._rt.ort
        import onnx

        info: dict[str, Any] = {
            "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "provider": self.provider, "device": self.device, "opset": OPSET,
            "intra_op_num_threads": self._rt.threads,
            "graph_optimization_level": "ORT_ENABLE_ALL (default)",
        }
        for mod in self._modules():
            notes = getattr(mod, "NOTES", None)
            if notes:
                info.setdefault("notes", {}).update(notes)
        return info


def _provider_works(provider: str) -> tuple[bool, str]:
    """Whether a session on ``provider`` really gets it (ONNX Runtime falls back to the
    CPU silently when the provider's libraries or device are missing)."""
    import onnxruntime as ort

    x = np.zeros((1, 2), np.float32)
    try:
        b = GraphBuilder([("x", _ELEM["float32"], 2)], "float32")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(b.model([b.op("Relu", "x")]).SerializeToString(), so,
                                    providers=[provider])
        sess.run(None, {"x": x})
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable here
        return False, f"{provider} failed: {str(exc).splitlines()[0][:200]}"
    if provider not in sess.get_providers():
        return False, f"{provider} is not usable here (no device)"
    return True, ""


def as_int64(a: np.ndarray) -> np.ndarray:
    """Token ids and targets as ONNX's int64 (the contract's integer dtype already)."""
    return np.asarray(a, dtype=np.int64)


def scalar_out(outs: Sequence[np.ndarray]) -> np.ndarray:
    """The first output of a graph as a 0-d array (the contract's scalar result)."""
    return np.asarray(outs[0]).reshape(())


__all__ = ["GraphBuilder", "OrtBackend", "Runtime", "as_int64", "elem_type", "float_dtype",
           "scalar_out"]
