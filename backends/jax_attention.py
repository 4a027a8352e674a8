"""Attention family on JAX's own functions.

``jax.nn.dot_product_attention`` (XLA implementation; layout ``[B, T, N, H]``, so the
contract's ``[B, h, L, E]`` is transposed at the boundary) for SDPA and inside multi-head
attention and the Transformer layers; ``jax.nn.softmax(where=mask)`` for the two
single-query attentions; ``jax.nn.standardize`` for layer norm as JAX code writes it
(``standardize(x)·γ + β``); ``jax.nn.relu`` / ``jax.nn.gelu(approximate=False)``.

Masks: the contract's and ``jax.nn.dot_product_attention``'s boolean masks both mean
"True = takes part". ``jax.nn.dot_product_attention`` fills a masked logit with a large
finite negative number, so a query that sees no key gets the *mean* of all values where
the contract asks for zeros; the backend returns what JAX returns and declares it (see
``DEVIATIONS``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmspec import Deviation
from lmspec.backends import declared
from lmspec.backends.declared import call_arguments, with_broader_predicates


def half_intermediates(key: str, why: str, ratios: Mapping[str, float],
                       measured: str = "jax 0.10.2, XLA CPU, 20 examples per check",
                       widened: str = "0.33") -> dict[str, Deviation]:
    """:func:`lmspec.backends.declared.half_intermediates` as measured for JAX (the later
    ones with ``benchmarks/measure_half.py``, which states its own ``measured``)."""
    return declared.half_intermediates(key, why, ratios, measured, widened)


AT_30 = "jax 0.10.2, XLA CPU, 30 examples per check, seeds 0-2, benchmarks/measure_half.py"
"""How the findings of the cited 30-example jax-cpu report were measured."""
OTHERWISE = "1 outside the op's other declared deviations"
"""A widened run that conformed where the op's other deviations did not excuse it."""


def half_findings(ratios: Mapping[str, Mapping[str, float]], why: str,
                  widened: str = "0.333") -> dict[str, Deviation]:
    """:func:`half_intermediates` for each ``op/check`` of ``ratios`` (its worst ratio per
    half dtype, measured :data:`AT_30`), all for the same cause ``why``."""
    return declared.merged(*(half_intermediates(f"{key}/{{dtype}}", why, r, AT_30, widened)
                             for key, r in ratios.items()))

NOTES = {
    "additive_attention": "JAX has no Bahdanau attention function: composed from matmuls, "
    "jnp.tanh and jax.nn.softmax(e, where=mask) (zero weights where masked, and for a row "
    "with no valid key).",
    "dot_product_attention": "JAX has no single-query Luong attention function: "
    "jnp.einsum and jax.nn.softmax(e, where=mask).",
    "scaled_dot_product_attention": "jax.nn.dot_product_attention (implementation None = "
    "XLA) on q, k, v transposed to [B, L, h, E], with mask (broadcast to 4 axes) and "
    "is_causal passed through; a query that sees no key gets jax's mean of all values (see "
    "DEVIATIONS). jax.nn.dot_product_attention requires value to have key's shape: for Ev ≠ E the "
    "shorter head dimension is padded with zero features (v's extra output features cut "
    "off; zeros in q and k add nothing to q·k, the default scale stays 1/√E). Refused by "
    "XLA, so unsupported: under jax.jit on the CPU, float16 always (jax asks for precision "
    "F16_F16_F32: 'not supported by dot_general on CPU') and bfloat16 with L = S = 1 "
    "(BF16_BF16_F32: 'not supported by the ElementalIrEmitter'); jax's own fallback to the "
    "default precision catches only errors raised while tracing, i.e. outside jit.",
    "multi_head_attention": "projections by matmul, heads as [B, L, h, D/h] into "
    "jax.nn.dot_product_attention (mask = key_valid[:, None, None, :], is_causal), then W_o; "
    "a query that sees no key gets jax's mean of the values.",
    "sinusoidal_positional_encoding": "jnp.arange, jnp.power, jnp.sin, jnp.cos in the "
    "requested dtype.",
    "layer_norm": "jax.nn.standardize(x, axis=-1, epsilon=eps) * gamma + beta "
    "(standardize's default algorithm='fast': variance as mean(x²) − mean(x)², clipped at 0).",
    "transformer_encoder_layer": "composed: multi_head_attention as above, layer_norm as "
    "above, feed-forward with jax.nn.relu or jax.nn.gelu(approximate=False).",
    "transformer_decoder_layer": "composed as the encoder layer; causal self-attention "
    "(is_causal), cross-attention masked by memory_valid.",
}


FLOAT32_SOFTMAX = (
    "jax.nn.dot_product_attention (XLA implementation) computes the attention softmax in "
    "float32 whatever the input dtype (_dot_product_attention_core: "
    "padded_logits.astype(np.float32), then probs.astype(key.dtype)), so float64 inputs get "
    "float32 accuracy: measured 5.8e-8 absolute error on outputs of magnitude 1 "
    "(q, k, v standard normal [1, 2, 3, 4]), where float64 rounding allows about 1e-16.")


REFUSALS = (
    # jax.nn.dot_product_attention asks for an f32-accumulating dot (precision
    # F16_F16_F32 / BF16_BF16_F32); under jax.jit on the CPU XLA refuses the first always
    # and the second where it emits the dot elementally (L = S = 1). Its own fallback to
    # the default precision only catches errors raised while tracing, i.e. outside jit.
    "is not supported by dot_general on CPU",
    "Algorithm not supported by the ElementalIrEmitter",
)


def _offset_rows(args, kwargs) -> bool:
    """Some row of ``x`` has a mean large against its spread: ``mean² > 9·(var + eps)``,
    where ``mean(x²) − mean(x)²`` cancels (layer_norm's fast variance)."""
    x = np.asarray(args[0], dtype=np.float64)
    mean, var = x.mean(axis=-1), x.var(axis=-1)
    return bool(np.any(mean * mean > 9 * (var + kwargs.get("eps", 1e-5))))


FAST_VARIANCE = Deviation(
    "jax.nn.standardize's default algorithm='fast' forms the variance as mean(x²) − mean(x)² "
    "(clipped at 0), which cancels when a row's mean is large against its spread (the "
    "conformance 'offset' rows, x in [90, 110]); measured: bfloat16 gives −158 where the "
    "spec gives −1.0, float16 −1.06 for −1.0, float32 (mean 100, std 0.01) errors of 5.0 on "
    "outputs of magnitude 1; in float16 the gradient is NaN where the clip at 0 is active. "
    "Only rows with mean² > 9·(var + eps) are covered.", applies=_offset_rows)



def _offset_or_small_variance(args, kwargs) -> bool:
    """``_offset_rows``, or a row with ``var + eps < 4e-4``, where rsqrt's derivative
    ``−(var + eps)^(−3/2)/2`` exceeds float16's largest finite value (65504)."""
    x = np.asarray(args[0], dtype=np.float64)
    return _offset_rows(args, kwargs) or bool(
        np.any(x.var(axis=-1) + kwargs.get("eps", 1e-5) < 4e-4))


FAST_VARIANCE_FLOAT16_GRAD = Deviation(
    FAST_VARIANCE.reason + " In float16 the gradient also overflows for rows with var + eps "
    "< 4e-4: jax differentiates jax.lax.rsqrt(var + eps) in float16, and its derivative "
    "−(var + eps)^(−3/2)/2 exceeds 65504 (−inf), giving NaN or ±inf gradients (measured: "
    "x = [0], γ = [0], β = [0], eps = 1e-5, cotangent 0: grad x NaN where the spec gives 0).",
    applies=_offset_or_small_variance)

def _has_subnormal(args, kwargs) -> bool:
    """Some float input holds a subnormal number (nonzero, below the smallest normal)."""
    def walk(a):
        if isinstance(a, (tuple, list)):
            return any(walk(b) for b in a)
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
            return False
        m = np.abs(a.astype(np.float64))
        return bool(np.any((m > 0) & (m < np.finfo(a.dtype).tiny)))
    return walk(tuple(args))


FLUSH_TO_ZERO = Deviation(
    "XLA on the CPU flushes subnormal numbers to zero (FTZ/DAZ): a product with a subnormal "
    "weight is 0, so a ReLU whose pre-activation is subnormal has derivative 0. Measured "
    "(float32, shrunk by Hypothesis): W_1 = [[0, 1.4e-45]], b_1 = 0 gives grad W_1[0,0] = 0 "
    "where the spec gives −0.0131. Covered: examples with a subnormal input.",
    applies=_has_subnormal)

def no_key_row(allow: np.ndarray) -> bool:
    """Some query row of a ``[..., L, S]`` visibility sees no key (``S ≥ 1``)."""
    return bool(allow.shape[-1] and (~np.asarray(allow, bool).any(axis=-1)).any())


def _visible(n_q: int, n_k: int, mask: Any, is_causal: bool) -> np.ndarray:
    allow = np.ones((n_q, n_k), bool)
    if is_causal:  # top-left, as the contract's and jax's is_causal
        allow = np.tril(allow)
    if mask is not None:
        m = np.asarray(mask, bool)
        allow = allow & m.reshape((1,) * (4 - m.ndim) + m.shape)
    return allow


def _sdpa_no_key(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    a = call_arguments("scaled_dot_product_attention", args, kwargs)
    q, k = np.asarray(a["q"]), np.asarray(a["k"])
    return no_key_row(_visible(q.shape[-2], k.shape[-2], a["mask"], a["is_causal"]))


def _valid_no_key(valid: Any, n_q: int, is_causal: bool) -> bool:
    if valid is None:
        return False
    kv = np.asarray(valid, bool)
    return no_key_row(_visible(n_q, kv.shape[1], kv[:, None, None, :], is_causal))


def _mha_no_key(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    a = call_arguments("multi_head_attention", args, kwargs)
    return _valid_no_key(a["key_valid"], np.asarray(a["query"]).shape[1], a["is_causal"])


def _encoder_no_key(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    a = call_arguments("transformer_encoder_layer", args, kwargs)
    return _valid_no_key(a["key_valid"], np.asarray(a["x"]).shape[1], a["is_causal"])


def _decoder_no_key(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """The cross-attention of some sequence sees no memory position (its causal
    self-attention always sees position 0)."""
    a = call_arguments("transformer_decoder_layer", args, kwargs)
    return _valid_no_key(a["memory_valid"], np.asarray(a["x"]).shape[1], False)


MEAN_OF_VALUES = (
    "jax.nn.dot_product_attention (XLA implementation) fills masked logits with a finite "
    "−0.7·(float32 max) instead of −inf, so a query that sees no key (its mask, with "
    "is_causal, leaves it none) gets the mean of all S values, and gradients 1/S of the "
    "cotangent into each value, where the spec gives zeros and zero gradients. Measured "
    "(jax 0.10.2; q [1,3,1,4], k, v [1,5,1,4], row 0 masked entirely): float32 output "
    "[−0.00121, 0.585, 0.832, 0.676] = mean of v to 6 digits, likewise float64 and "
    "bfloat16; an error of max|mean v| (~0.1–1 for values drawn in [−2, 2]).")


def _any_of(*preds: Any) -> Any:
    def applies(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
        return any(p(args, kwargs) for p in preds)
    return applies


def _float32_softmax(op: str) -> Deviation:
    return Deviation(
        FLOAT32_SOFTMAX + " Judged as computed in float32 (bound). A query that sees no key "
        "(mean of the values, see the deviation of the op) keeps its predicate beside this "
        "bound in float64.",
        bound="float32")


_DEVIATIONS: dict[str, object] = {
    "scaled_dot_product_attention": Deviation(MEAN_OF_VALUES, applies=_sdpa_no_key),
    "multi_head_attention": Deviation(MEAN_OF_VALUES, applies=_mha_no_key),
    "transformer_encoder_layer": Deviation(MEAN_OF_VALUES + " (self-attention)",
                                           applies=_encoder_no_key),
    "transformer_decoder_layer": Deviation(
        MEAN_OF_VALUES + " (cross-attention: every memory position invalid)",
        applies=_decoder_no_key),
    "transformer_encoder_layer/vjp/float32": Deviation(
        FLUSH_TO_ZERO.reason + " Also covered: " + MEAN_OF_VALUES,
        applies=_any_of(_has_subnormal, _encoder_no_key)),
} | {f"{op}/*/float64": _float32_softmax(op)
     for op in ("scaled_dot_product_attention", "multi_head_attention",
                "transformer_encoder_layer", "transformer_decoder_layer")
     } | {f"layer_norm/{check}": FAST_VARIANCE
          for check in ("forward", "vjp", "zero_mean_unit_variance")
          } | {"layer_norm/vjp/float16": FAST_VARIANCE_FLOAT16_GRAD}
DEVIATIONS = with_broader_predicates(declared.merged(
    _DEVIATIONS, half_intermediates(
        "scaled_dot_product_attention/vjp/{dtype}",
        "jax.nn.dot_product_attention (XLA CPU) rounds the weights to the input dtype "
        "after its float32 softmax (probs.astype(key.dtype)), and its backward holds them "
        "and the gradients of the scores as arrays of it.", {"bfloat16": 2.81}, AT_30,
        OTHERWISE),
    half_intermediates(
        "layer_norm/forward/{dtype}",
        "the mean, the variance and the normalised x are arrays of the input dtype (XLA CPU "
        "keeps float16 reductions in float16), rounded to it before γ and β.",
        {"float16": 2.40}, AT_30, "0.304"),
    half_intermediates(
        "layer_norm/vjp/{dtype}",
        "jax.vjp of the same composition: the statistics and the per-row terms of the "
        "gradient are arrays of the input dtype.", {"float16": 34.7, "bfloat16": 1.47},
        AT_30, "0.331"),
    half_findings({
    "additive_attention/forward": {"float16": 5.55, "bfloat16": 6.37},
    "additive_attention/vjp": {"float16": 34.6, "bfloat16": 498},
    "dot_product_attention/forward": {"float16": 1.62, "bfloat16": 3.89},
    "dot_product_attention/vjp": {"float16": 87.1, "bfloat16": 26.8},
    }, "composed from matmuls and jnp.einsum (XLA's CPU dot at jax's default precision), "
        "jnp.tanh (Bahdanau's scores) and jax.nn.softmax as JAX code writes them: the "
        "projections, the scores and the weights "
        "are arrays of the input dtype (rounded to it), and jax.vjp's backward likewise."),
    half_findings({
    "multi_head_attention/forward": {"bfloat16": 1.16},
    "multi_head_attention/vjp": {"bfloat16": 1.04},
    "transformer_encoder_layer/forward": {"bfloat16": 7.93},
    "transformer_encoder_layer/vjp": {"bfloat16": 2.62},
    "transformer_decoder_layer/forward": {"bfloat16": 9.92},
    "transformer_decoder_layer/vjp": {"bfloat16": 3.48},
    }, "composed around jax.nn.dot_product_attention: the projections (XLA CPU matmuls), the "
        "attention weights (rounded to the input dtype after its float32 softmax), the "
        "residual stream, the layer norms and the feed-forward outputs are arrays of the input "
        "dtype (rounded to it), and jax.vjp's backward likewise; in float16 this stays inside "
        "the tolerance, in bfloat16 it does not.", OTHERWISE)))


# -- single-query attention (composed) -------------------------------------------------

def _weighted(e, values, mask):
    w = jax.nn.softmax(e, axis=-1, where=mask)
    return jnp.einsum("bs,bsv->bv", w, values), w


def additive_attention(query, keys, values, W_q, W_k, v, mask=None):
    e = jnp.tanh((query @ W_q.T)[:, None, :] + keys @ W_k.T) @ v
    return _weighted(e, values, mask)


def dot_product_attention(query, keys, values, mask=None):
    return _weighted(jnp.einsum("bsd,bd->bs", keys, query), values, mask)


# -- SDPA and multi-head attention -------------------------------------------------------

def _attend(q, k, v, mask, is_causal: bool, scale):
    """``jax.nn.dot_product_attention`` on ``[B, T, N, H]`` arrays (a mask of fewer than 4
    axes given its leading unit axes)."""
    if mask is not None and mask.ndim < 4:
        mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal)


def _pad_last(a, n: int):
    return a if a.shape[-1] == n else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n - a.shape[-1])])


def head_dims_matched(q, k, v, scale):
    """``(q, k, v, scale)`` with the head dimensions made equal, as
    ``jax.nn.dot_product_attention`` requires (value shaped like key): zero features
    appended to ``v`` (``Ev < E``; the extra output features are cut off by the caller) or
    to ``q`` and ``k`` (``Ev > E``; zeros add nothing to ``q·k``, and the default scale
    stays ``1/√E``)."""
    e, ev = q.shape[-1], v.shape[-1]
    if ev > e:
        scale = float(1.0 / np.sqrt(e)) if scale is None else scale
        q, k = _pad_last(q, ev), _pad_last(k, ev)
    return q, k, _pad_last(v, max(e, ev)), scale


def scaled_dot_product_attention(q, k, v, mask=None, is_causal=False, scale=None):
    ev = v.shape[-1]
    q, k, v, scale = head_dims_matched(q, k, v, scale)
    out = _attend(*(jnp.swapaxes(a, 1, 2) for a in (q, k, v)), mask, is_causal, scale)
    return jnp.swapaxes(out, 1, 2)[..., :ev]


def _heads(x, W, b, h: int):
    y = x @ W.T + b
    return y.reshape(*y.shape[:2], h, y.shape[-1] // h)


def _mha(query, key, value, p, num_heads: int, key_valid, is_causal: bool):
    W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o = p
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = _attend(_heads(query, W_q, b_q, num_heads), _heads(key, W_k, b_k, num_heads),
                  _heads(value, W_v, b_v, num_heads), mask, is_causal, None)
    return out.reshape(*out.shape[:2], -1) @ W_o.T + b_o


def multi_head_attention(query, key, value, W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o,
                         num_heads, key_valid=None, is_causal=False):
    return _mha(query, key, value, (W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o), num_heads,
                key_valid, is_causal)


# -- positional encoding and layer norm --------------------------------------------------

def sinusoidal_positional_encoding(length, d_model, base=10000.0, dtype="float64"):
    pos = jnp.arange(length, dtype=dtype)[:, None]
    inv_freq = jnp.power(jnp.asarray(base, dtype),
                         -jnp.arange(0, d_model, 2, dtype=dtype) / d_model)
    angle = pos * inv_freq
    return jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(length, d_model)


def layer_norm(x, gamma, beta, eps=1e-5):
    return jax.nn.standardize(x, axis=-1, epsilon=eps) * gamma + beta


# -- Transformer layers --------------------------------------------------------------------

def _ffn(x, W_1, b_1, W_2, b_2, activation: str):
    z = x @ W_1.T + b_1
    z = jax.nn.relu(z) if activation == "relu" else jax.nn.gelu(z, approximate=False)
    return z @ W_2.T + b_2


def _sublayer(x, f, norm, norm_first: bool, eps):
    if norm_first:
        return x + f(layer_norm(x, *norm, eps))
    return layer_norm(x + f(x), *norm, eps)


def transformer_encoder_layer(x, weights, num_heads, key_valid=None, is_causal=False,
                              norm_first=False, activation="relu", eps=1e-5):
    sa, ffn, n1, n2 = weights[:8], weights[8:12], weights[12:14], weights[14:16]
    x = _sublayer(x, lambda z: _mha(z, z, z, sa, num_heads, key_valid, is_causal), n1,
                  norm_first, eps)
    return _sublayer(x, lambda z: _ffn(z, *ffn, activation), n2, norm_first, eps)


def transformer_decoder_layer(x, memory, weights, num_heads, memory_valid=None,
                              norm_first=False, activation="relu", eps=1e-5):
    sa, ca, ffn = weights[:8], weights[8:16], weights[16:20]
    n1, n2, n3 = weights[20:22], weights[22:24], weights[24:26]
    x = _sublayer(x, lambda z: _mha(z, z, z, sa, num_heads, None, True), n1, norm_first, eps)
    x = _sublayer(x, lambda z: _mha(z, memory, memory, ca, num_heads, memory_valid, False),
                  n2, norm_first, eps)
    return _sublayer(x, lambda z: _ffn(z, *ffn, activation), n3, norm_first, eps)
