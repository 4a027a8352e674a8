"""Attention family as ONNX graphs around the ``Attention`` operator (ONNX opset 23) and
``LayerNormalization`` (opset 17), run by ONNX Runtime's kernels.

``Attention`` takes 4-d ``[B, h, L, E]`` inputs (scaled dot-product attention), or 3-d
``[B, L, h·E]`` ones with ``q_num_heads``/``kv_num_heads`` (multi-head attention after
the projections, head ``j`` reading features ``j·E … (j+1)·E``, as the contract splits
them). Its boolean ``attn_mask`` means "True = attend", as the contract's masks do.

ONNX Runtime's CPU kernel (``core/providers/cpu/llm/attention.cc``) reads the mask as
full ``[L, S]`` slices (its leading axes may be 1 or full), so a mask is broadcast to
``[·, ·, L, S]`` before it is fed; a masked score is set to the lowest finite float, not
``-inf`` (a query whose keys are all masked gets zeros in 1.32, as the contract says).
The kernel refuses ``scale <= 0`` (``ORT_ENFORCE(scale_ > 0)``): such examples are
unsupported. There is no float64 kernel: ONNX Runtime runs ONNX's function body of
``Attention`` instead (see ``DEVIATIONS``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np

import lmspec
from lmspec.backends.onnxruntime_backend import Runtime

NOTES = {
    "scaled_dot_product_attention": "ONNX Attention (opset 23) with 4-d inputs, is_causal and "
                                    "scale attributes, boolean attn_mask broadcast to "
                                    "[·,·,L,S]; scale <= 0 is unsupported (the kernel "
                                    "enforces scale > 0).",
    "dot_product_attention": "ONNX Attention (opset 23), one query and one head, scale=1, "
                             "the weights from its qk_matmul_output (mode 3: after softmax).",
    "multi_head_attention": "ONNX MatMul/Add projections around Attention (opset 23) with 3-d "
                            "inputs and q_num_heads = kv_num_heads = num_heads.",
    "layer_norm": "ONNX LayerNormalization (axis=-1; epsilon is a float32 attribute).",
    "transformer_encoder_layer": "ONNX graph: Attention (opset 23) with MatMul/Add "
                                 "projections, LayerNormalization, MatMul/Add feed-forward "
                                 "with Relu or Gelu (opset 20, exact).",
    "transformer_decoder_layer": "as the encoder layer, with a causal self-attention and a "
                                 "cross-attention on the memory.",
}


def _arg(op: str, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Argument ``name`` of a call of ``op`` (its default when not passed)."""
    sig = inspect.signature(lmspec.OPS[op].reference)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments[name]


def _f32_inexact(value: float) -> bool:
    return float(np.float32(value)) != float(value)


def _sqrt_scale_inexact(scale: float | None, head_dim: int) -> bool:
    """Whether ``√scale``, as ONNX's Attention function body forms it in float32, is not
    exactly the float64 value (``scale`` default ``1/√E``)."""
    s = 1.0 / np.sqrt(np.float32(head_dim)) if scale is None else np.float32(scale)
    r = np.float64(np.sqrt(np.float32(s)))
    return bool(r * r != (1.0 / np.sqrt(head_dim) if scale is None else float(scale)))


def _attention_f64(op: str) -> Any:
    """A ``Deviation`` predicate for ops whose float64 graph runs ONNX's Attention
    function body: the example's ``√scale`` is not exact in float32."""

    def applies(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
        first = np.asarray(args[0])
        if op == "scaled_dot_product_attention":
            return _sqrt_scale_inexact(_arg(op, "scale", args, kwargs), first.shape[-1])
        return _sqrt_scale_inexact(None, first.shape[-1] // int(_arg(op, "num_heads", args,
                                                                     kwargs)))

    return applies


_F64_ATTENTION = (
    "ONNX Runtime has no float64 kernel for Attention (opset 23): it runs ONNX's function "
    "body of the op, which forms the scale's square root in float32 (ScaleF → Sqrt → Cast "
    "to double) and multiplies q and k by it, so every score carries a relative error of "
    "up to ~6e-8 (measured |err| 1e-10 to 2.6e-8 on outputs of size ~1, e.g. E = 3, 4 and "
    "scale 0.5). Examples whose √scale is exact in float32 conform.")
def DEVIATIONS(provider: str) -> dict[str, Any]:  # noqa: N802 - the backend's DEVIATIONS hook
    """Known differences of ONNX Runtime's kernels from the spec (measured)."""
    if provider != "CPUExecutionProvider":
        return {}
    return {f"{op}/forward/float64": lmspec.Deviation(_F64_ATTENTION, _attention_f64(op))
            for op in ("scaled_dot_product_attention", "multi_head_attention",
                       "transformer_encoder_layer", "transformer_decoder_layer")} | {
        f"{op}/forward/float16": lmspec.Deviation(_F16_ATTENTION.format(ratio=ratio),
                                                  bound="float16")
        for op, ratio in (("scaled_dot_product_attention", 53.4),
                          ("dot_product_attention", 1.62))}


_F16_ATTENTION = (
    "ONNX Runtime 1.32's CPU Attention kernel for float16 (opset 23) rounds intermediates "
    "to float16 (its GEMMs take and write float16 buffers, so the scores and the weights "
    "between them are float16). Measured (30 examples): worst error/tolerance {ratio} against the "
    "float32-intermediate model, while the same graph on the inputs widened to float32, its "
    "output rounded to float16, conforms (worst ratio 0.33). Judged at float16 working "
    "precision.")


def _mask4(mask: np.ndarray, L: int, S: int) -> np.ndarray:
    """A boolean mask as the kernel reads it: ``[b, h, L, S]`` with full last two axes."""
    m = np.asarray(mask, dtype=bool)
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    return np.ascontiguousarray(np.broadcast_to(m, m.shape[:2] + (L, S)))


def _check_scale(scale: float | None) -> None:
    if scale is not None and not scale > 0:
        raise NotImplementedError("ONNX Runtime's Attention kernel requires scale > 0")


def scaled_dot_product_attention(rt: Runtime, q, k, v, mask=None, is_causal=False, scale=None):
    _check_scale(scale)
    L, S = q.shape[-2], k.shape[-2]
    feeds = [("q", q), ("k", k), ("v", v)]
    if mask is not None:
        feeds.append(("mask", _mask4(mask, L, S)))
    attrs = dict(is_causal=int(bool(is_causal)),
                 scale=None if scale is None else float(scale))

    def build(b: Any, n: list[str]) -> str:
        return b.op("Attention", "q", "k", "v", "mask" if mask is not None else "", **attrs)

    return rt.run(("sdpa", tuple(attrs.items())), feeds, build)[0]


def dot_product_attention(rt: Runtime, query, keys, values, mask=None):
    B, S = keys.shape[:2]
    feeds = [("q", query[:, None, None, :]), ("k", keys[:, None]), ("v", values[:, None])]
    if mask is not None:
        feeds.append(("mask", _mask4(np.asarray(mask, bool)[:, None, None, :], 1, S)))

    def build(b: Any, n: list[str]) -> list[str]:
        outs = b.op("Attention", "q", "k", "v", "mask" if mask is not None else "", "", "",
                    outputs=4, scale=1.0, qk_matmul_output_mode=3)
        return [outs[0], outs[3]]

    ctx, w = rt.run(("dot_product_attention",), feeds, build)
    return ctx[:, 0, 0], w[:, 0, 0]


# -- multi-head blocks ----------------------------------------------------------------

def _linear(b: Any, x: str, W: str, bias: str) -> str:
    """``x Wᵀ + b`` for ``x[..., in]``, ``W[out, in]``."""
    return b.op("Add", b.op("MatMul", x, b.op("Transpose", W, perm=[1, 0])), bias)


def _mha(b: Any, xq: str, xk: str, xv: str, p: Sequence[str], num_heads: int, mask: str,
         is_causal: bool) -> str:
    """Projections, ``Attention`` on 3-d inputs, output projection; ``p`` names
    ``(W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o)``."""
    Q, K, V = (_linear(b, x, W, bias) for x, W, bias in zip((xq, xk, xv), p[:3], p[3:6]))
    y = b.op("Attention", Q, K, V, mask, q_num_heads=num_heads, kv_num_heads=num_heads,
             is_causal=int(bool(is_causal)))
    return _linear(b, y, p[6], p[7])


def _valid_mask(valid: np.ndarray | None, L: int, name: str) -> list[tuple[str, np.ndarray]]:
    if valid is None:
        return []
    v = np.asarray(valid, dtype=bool)
    return [(name, _mask4(v[:, None, None, :], L, v.shape[1]))]


def multi_head_attention(rt: Runtime, query, key, value, W_q, W_k, W_v, b_q, b_k, b_v, W_o,
                         b_o, num_heads, key_valid=None, is_causal=False):
    ws = (W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o)
    names = [f"p{i}" for i in range(8)]
    feeds = [("query", query), ("key", key), ("value", value), *zip(names, ws)]
    feeds += _valid_mask(key_valid, query.shape[1], "mask")
    h = int(num_heads)

    def build(b: Any, _: list[str]) -> str:
        return _mha(b, "query", "key", "value", names, h,
                    "mask" if key_valid is not None else "", is_causal)

    return rt.run(("mha", h, bool(is_causal)), feeds, build)[0]


def layer_norm(rt: Runtime, x, gamma, beta, eps=1e-5):
    e = float(eps)
    return rt.run(("LayerNormalization", e), [("x", x), ("gamma", gamma), ("beta", beta)],
                  lambda b, n: b.op("LayerNormalization", *n, axis=-1, epsilon=e))[0]


def _ffn(b: Any, x: str, p: Sequence[str], activation: str) -> str:
    if activation not in ("relu", "gelu"):
        raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
    hidden = _linear(b, x, p[0], p[1])
    hidden = b.op("Relu", hidden) if activation == "relu" else b.op("Gelu", hidden)
    return _linear(b, hidden, p[2], p[3])


def _sublayer(b: Any, x: str, block: Any, norm: Sequence[str], norm_first: bool,
              eps: float) -> str:
    """Post-norm ``LN(x + block(x))`` or pre-norm ``x + block(LN(x))``."""
    def ln(t: str) -> str:
        return b.op("LayerNormalization", t, *norm, axis=-1, epsilon=eps)

    return b.op("Add", x, block(ln(x))) if norm_first else ln(b.op("Add", x, block(x)))


def transformer_encoder_layer(rt: Runtime, x, weights, num_heads, key_valid=None,
                              is_causal=False, norm_first=False, activation="relu", eps=1e-5):
    names = [f"w{i}" for i in range(len(weights))]
    feeds = [("x", x), *zip(names, weights)] + _valid_mask(key_valid, x.shape[1], "mask")
    h, e = int(num_heads), float(eps)
    mask = "mask" if key_valid is not None else ""

    def build(b: Any, _: list[str]) -> str:
        y = _sublayer(b, "x", lambda t: _mha(b, t, t, t, names[:8], h, mask, is_causal),
                      names[12:14], norm_first, e)
        return _sublayer(b, y, lambda t: _ffn(b, t, names[8:12], activation), names[14:16],
                         norm_first, e)

    key = ("encoder", h, bool(is_causal), bool(norm_first), activation, e)
    return rt.run(key, feeds, build)[0]


def transformer_decoder_layer(rt: Runtime, x, memory, weights, num_heads, memory_valid=None,
                              norm_first=False, activation="relu", eps=1e-5):
    names = [f"w{i}" for i in range(len(weights))]
    feeds = [("x", x), ("memory", memory), *zip(names, weights)]
    feeds += _valid_mask(memory_valid, x.shape[1], "mask")
    h, e = int(num_heads), float(eps)
    mask = "mask" if memory_valid is not None else ""

    def build(b: Any, _: list[str]) -> str:
        y = _sublayer(b, "x", lambda t: _mha(b, t, t, t, names[:8], h, "", True),
                      names[20:22], norm_first, e)
        y = _sublayer(b, y, lambda t: _mha(b, t, "memory", "memory", names[8:16], h, mask, False),
                      names[22:24], norm_first, e)
        return _sublayer(b, y, lambda t: _ffn(b, t, names[16:20], activation), names[24:26],
                         norm_first, e)

    key = ("decoder", h, bool(norm_first), activation, e)
    return rt.run(key, feeds, build)[0]
