"""Modern family as ONNX graphs: ``RMSNormalization``, ``RotaryEmbedding`` and
``Attention`` (ONNX opset 23, grouped-query heads, ``softcap``), ``Gelu`` (opset 20) and
``SoftmaxCrossEntropyLoss``, run by ONNX Runtime's kernels.

What the ONNX operators do not express is unsupported (``NotImplementedError``), never
composed: ``grouped_query_attention``'s ALiBi slopes, ``fused_linear_cross_entropy``'s
z-loss and label smoothing. ``Attention``'s boolean ``attn_mask`` carries any visibility
pattern, so a sliding window, and a causal ``q_offset`` other than ``0`` or ``S − L`` (which
is expressed as a key/value cache: the first ``S − L`` keys fed as
``past_key``/``past_value``), are given to the kernel as that mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import lmspec
from lmspec.backends.onnxruntime_backend import Runtime, as_int64, elem_type, scalar_out
from lmspec.backends.ort_attention import (
    _F16_ATTENTION,
    _F64_ATTENTION,
    _arg,
    _check_scale,
    _f32_inexact,
    _mask4,
    _sqrt_scale_inexact,
)

NOTES = {
    "rms_norm": "ONNX RMSNormalization (opset 23, axis=-1; epsilon is a float32 attribute; "
                "weight None is fed as ones).",
    "rotary_embedding": "ONNX RotaryEmbedding (opset 23) with 3-d cos/sin caches "
                        "[B, T, r/2] formed in the graph in float32 (Range, Pow, Mul, "
                        "Cos, Sin) and cast to the dtype under test, as models feeding "
                        "the operator do; rotary_embedding_dim = r. float64 is not in "
                        "the operator's type constraints.",
    "gated_mlp": "ONNX MatMul; silu as Mul(a, Sigmoid(a)), gelu and gelu_tanh as Gelu "
                 "(approximate 'none' / 'tanh').",
    "grouped_query_attention": "ONNX Attention (opset 23), 4-d inputs with h query heads and "
                               "g key/value heads, is_causal and softcap attributes; a causal "
                               "q_offset = S − L as past_key/past_value; the sliding window "
                               "and any other causal q_offset, which no attribute expresses, "
                               "as the boolean attn_mask (the visibility pattern, from "
                               "integer positions); alibi_slopes is unsupported.",
    "fused_linear_cross_entropy": "ONNX MatMul (+ Add), softcap as Mul(Tanh(Div)), "
                                  "SoftmaxCrossEntropyLoss (mean, ignore_index); z_loss > 0 "
                                  "and label_smoothing > 0 are unsupported.",
}

_F32_RMS_EPS = ("RMSNormalization's epsilon is a float32 attribute: ε = 1e-6 becomes "
                "9.99999997475e-07, which moves rows whose mean square is small. ")


_GELU_TANH_F64 = (
    "ONNX Runtime has no float64 Gelu kernel: it runs ONNX's function body of Gelu, whose "
    "constants 2/π and 0.044715 are float32 initializers cast to double, so "
    "approximate='tanh' is off by ~5e-9 (measured Gelu(1.0) − spec = −4.82e-9). ")


def _gqa_applies(args: Any, kwargs: dict[str, Any]) -> bool:
    op = "grouped_query_attention"
    return _sqrt_scale_inexact(_arg(op, "scale", args, kwargs), np.asarray(args[0]).shape[-1])


def DEVIATIONS(provider: str) -> dict[str, Any]:  # noqa: N802 - the backend's DEVIATIONS hook
    """Known differences of ONNX Runtime's kernels from the spec (measured)."""
    if provider != "CPUExecutionProvider":
        return {}
    return {
        "grouped_query_attention/forward/float64": lmspec.Deviation(_F64_ATTENTION,
                                                                    _gqa_applies),
        "rms_norm/unit_mean_square/float64": lmspec.Deviation(
            _F32_RMS_EPS + "Measured on mean(y²) = ms/(ms + ε): 2.6e-15 for ms ≫ ε, up to "
            "5.7e-10 where ms is comparable to ε (value 0.34); the forward check conforms.",
            lambda a, k: _f32_inexact(_arg("rms_norm", "eps", a, k))),
        "grouped_query_attention/forward/float16": lmspec.Deviation(
            _F16_ATTENTION.format(ratio=8.47), bound="float16"),
        "gated_mlp/forward/float64": lmspec.Deviation(
            _GELU_TANH_F64,
            lambda a, k: _arg("gated_mlp", "activation", a, k) == "gelu_tanh"),
    }


def rms_norm(rt: Runtime, x, weight=None, eps=1e-6):
    e = float(eps)
    feeds = [("x", x)] + ([] if weight is None else [("weight", weight)])

    def build(b: Any, _: list[str]) -> str:
        w = "weight" if weight is not None else b.const(np.ones(x.shape[-1]))
        return b.op("RMSNormalization", "x", w, axis=-1, epsilon=e)

    return rt.run(("RMSNormalization", e, weight is None, x.shape[-1] if weight is None
                   else None), feeds, build)[0]


def rotary_embedding(rt: Runtime, x, positions, base=10000.0, interleaved=False,
                     rotary_dim=None):
    B, h, T, E = x.shape
    r = int(rotary_dim or E)
    pos = np.ascontiguousarray(np.broadcast_to(as_int64(positions), (B, T)))
    half = r // 2

    def build(b: Any, _: list[str]) -> str:
        # the cos/sin tables, inputs of RotaryEmbedding, are formed in float32 (θ_i =
        # base^(−2i/r), φ = pos·θ: [B, T, r/2]) and cast to the dtype under test, as models
        # that feed this operator form them; the rotation itself runs in that dtype
        f32 = elem_type("float32")
        i = b.op("Cast", b.op("Range", b.const(0, "int64"), b.const(half, "int64"),
                              b.const(1, "int64")), to=f32)
        expo = b.op("Div", b.op("Mul", i, b.const(-2.0, "float32")),
                    b.const(float(r), "float32"))
        theta = b.op("Pow", b.const(float(base), "float32"), expo)
        phi = b.op("Mul", b.op("Unsqueeze", b.op("Cast", "pos", to=f32), b.ints(2)), theta)
        cos, sin = b.op("Cos", phi), b.op("Sin", phi)
        if b.float_type != "float32":
            cos, sin = (b.op("Cast", t, to=elem_type(b.float_type)) for t in (cos, sin))
        return b.op("RotaryEmbedding", "x", cos, sin, interleaved=int(bool(interleaved)),
                    rotary_embedding_dim=r)

    key = ("RotaryEmbedding", float(base), bool(interleaved), r)
    return rt.run(key, [("x", x), ("pos", pos)], build)[0]


def gated_mlp(rt: Runtime, x, W_gate, W_up, W_down, activation="silu"):
    if activation not in ("silu", "gelu", "gelu_tanh"):
        raise ValueError(f"gated_mlp: activation must be silu, gelu or gelu_tanh, "
                         f"got {activation!r}")

    def mm(b: Any, a: str, W: str) -> str:
        return b.op("MatMul", a, b.op("Transpose", W, perm=[1, 0]))

    def build(b: Any, _: list[str]) -> str:
        g = mm(b, "x", "W_gate")
        if activation == "silu":
            g = b.op("Mul", g, b.op("Sigmoid", g))
        else:
            g = b.op("Gelu", g, approximate="tanh" if activation == "gelu_tanh" else "none")
        return mm(b, b.op("Mul", g, mm(b, "x", "W_up")), "W_down")

    feeds = [("x", x), ("W_gate", W_gate), ("W_up", W_up), ("W_down", W_down)]
    return rt.run(("gated_mlp", activation), feeds, build)[0]


def _band(L: int, S: int, q_offset: int, window: Any) -> np.ndarray:
    """``[L, S]``: key ``j`` within ``window = (left, right)`` of query position
    ``q_offset + i`` (all True without a window)."""
    rel = np.arange(S)[None, :] - (q_offset + np.arange(L)[:, None])
    band = np.ones((L, S), dtype=bool)
    if window is not None:
        left, right = window
        if left is not None:
            band &= rel >= -left
        if right is not None:
            band &= rel <= right
    return band


def grouped_query_attention(rt: Runtime, q, k, v, mask=None, is_causal=False, scale=None,
                            q_offset=0, window=None, alibi_slopes=None, softcap=None):
    _check_scale(scale)
    if alibi_slopes is not None:
        raise NotImplementedError("ONNX Attention has no ALiBi bias")
    L, S = q.shape[-2], k.shape[-2]
    causal, past, band = bool(is_causal), 0, _band(L, S, int(q_offset), window)
    if causal and q_offset:
        if 0 < q_offset == S - L:
            past = int(q_offset)  # the first S − L keys as a key/value cache
        else:  # no ONNX alignment for this offset: the visibility pattern as the mask
            causal = False
            band &= np.arange(S)[None, :] <= q_offset + np.arange(L)[:, None]
    if not band.all():
        mask = band if mask is None else np.asarray(mask, dtype=bool) & band
    feeds = [("q", q), ("k", k[:, :, past:]), ("v", v[:, :, past:])]
    if mask is not None:
        feeds.append(("mask", _mask4(mask, L, S)))
    if past:
        feeds += [("past_k", k[:, :, :past]), ("past_v", v[:, :, :past])]
    attrs = dict(is_causal=int(causal), scale=None if scale is None else float(scale),
                 softcap=None if softcap is None else float(softcap))

    def build(b: Any, _: list[str]) -> str:
        ins = ["q", "k", "v", "mask" if mask is not None else ""]
        if past:
            return b.op("Attention", *ins, "past_k", "past_v", outputs=3, **attrs)[0]
        return b.op("Attention", *ins, **attrs)

    return rt.run(("gqa", bool(past), tuple(attrs.items())), feeds, build)[0]


def fused_linear_cross_entropy(rt: Runtime, hidden, weight, targets, bias=None,
                               ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                               softcap=None):
    if label_smoothing:
        raise NotImplementedError("ONNX SoftmaxCrossEntropyLoss has no label smoothing")
    if z_loss:
        raise NotImplementedError("ONNX has no z-loss")
    ii = int(ignore_index)
    feeds = [("hidden", hidden), ("weight", weight), ("targets", as_int64(targets))]
    if bias is not None:
        feeds.append(("bias", bias))

    def build(b: Any, _: list[str]) -> str:
        z = b.op("MatMul", "hidden", b.op("Transpose", "weight", perm=[1, 0]))
        if bias is not None:
            z = b.op("Add", z, "bias")
        if softcap is not None:
            c = b.const(float(softcap))
            z = b.op("Mul", b.op("Tanh", b.op("Div", z, c)), c)
        return b.op("SoftmaxCrossEntropyLoss", z, "targets", reduction="mean", ignore_index=ii)

    key = ("flce", ii, bias is None, None if softcap is None else float(softcap))
    return scalar_out(rt.run(key, feeds, build))
