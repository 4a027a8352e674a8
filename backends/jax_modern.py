"""Modern family in JAX.

``jax.nn.dot_product_attention`` with ``K < N`` key/value heads (its grouped-query form:
query head ``n`` reads key/value head ``n // (N/K)``) for grouped-query attention, with the
ALiBi term as its additive ``bias`` and the visibility (mask, causal at ``q_offset``,
window) as its boolean ``mask``; ``jax.nn.silu`` / ``jax.nn.gelu`` for the gated MLP.
JAX has no RMS-norm, rotary-embedding or fused linear-cross-entropy function: those are
composed as JAX code (Flax, MaxText) writes them; see ``NOTES``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmspec import Deviation
from lmspec.backends.jax_attention import (
    AT_30,
    FLOAT32_SOFTMAX,
    MEAN_OF_VALUES,
    OTHERWISE,
    call_arguments,
    half_intermediates,
    head_dims_matched,
    no_key_row,
    with_broader_predicates,
)

NOTES = {
    "rms_norm": "JAX has no RMS-norm function: x · jax.lax.rsqrt(mean(x², -1) + eps) · weight "
    "computed in float32 for float16/bfloat16 inputs (float64 for float64) and cast back, "
    "as Flax's nn.RMSNorm computes its statistics in at least float32.",
    "rotary_embedding": "JAX has no rotary function: composed as MaxText/Flax models do, the "
    "angles positions·θ and their jnp.cos/jnp.sin in float32 (float64 for float64 inputs), "
    "cast to the input dtype, the rotation in the input dtype.",
    "gated_mlp": "matmuls with jax.nn.silu, jax.nn.gelu(approximate=False) or "
    "jax.nn.gelu(approximate=True).",
    "grouped_query_attention": "jax.nn.dot_product_attention (XLA) on [B, L, h, E] with the "
    "key/value heads as its K < N heads, scale passed through, bias = −slope·|q_offset + i "
    "− j| (ALiBi), boolean mask = mask ∧ causal at q_offset ∧ window; a query that sees no "
    "key gets jax's mean of the values (see DEVIATIONS); Ev ≠ E padded with zero "
    "features as for scaled_dot_product_attention. softcap has no "
    "jax.nn.dot_product_attention form (a nonlinearity of the scores): with softcap the op "
    "is composed from jnp.einsum, "
    "jnp.tanh and jax.nn.softmax(where=visible), as Gemma 2's JAX code writes it.",
    "fused_linear_cross_entropy": "JAX has no fused linear-cross-entropy function: matmul, "
    "softcap·jnp.tanh(z/softcap), the cross-entropy of jax_core (from jax.nn.log_softmax) "
    "and, for z_loss > 0, the mean over the kept rows of z_loss·lse², lse = "
    "jax.scipy.special.logsumexp, summed as lse·(z_loss·lse/n) so that no float16 summand "
    "exceeds the result.",
}

STATIC = {"fused_linear_cross_entropy": ("label_smoothing", "z_loss")}


def _without_softcap(args, kwargs) -> bool:
    return call_arguments("grouped_query_attention", args, kwargs)["softcap"] is None


def _gqa_no_key(args, kwargs) -> bool:
    """Without softcap (jax.nn.dot_product_attention), some query sees no key: the mask,
    causality at q_offset and the window leave it none."""
    a = call_arguments("grouped_query_attention", args, kwargs)
    if a["softcap"] is not None:
        return False
    n_q, n_k = np.asarray(a["q"]).shape[2], np.asarray(a["k"]).shape[2]
    rel = np.arange(n_k)[None, :] - (int(a["q_offset"]) + np.arange(n_q))[:, None]
    allow = np.ones((n_q, n_k), bool)
    if a["is_causal"]:
        allow &= rel <= 0
    if a["window"] is not None:
        left, right = a["window"]
        if left is not None:
            allow &= rel >= -left
        if right is not None:
            allow &= rel <= right
    if a["mask"] is not None:
        m = np.asarray(a["mask"], bool)
        allow = allow & m.reshape((1,) * (4 - m.ndim) + m.shape)
    return no_key_row(allow)


DEVIATIONS = {
    "grouped_query_attention": Deviation(
        MEAN_OF_VALUES + " Only without softcap (with softcap the op is composed with "
        "jax.nn.softmax(where=visible), which gives zeros).", applies=_gqa_no_key),
} | {
    f"grouped_query_attention/{check}/float64": Deviation(
        FLOAT32_SOFTMAX + " Judged as computed in float32 (bound), only without softcap "
        "(with softcap the op is composed in the input dtype); a query that sees no key "
        "keeps its predicate beside this bound.", applies=_without_softcap, bound="float32")
    for check in ("forward", "vjp")
} | half_intermediates(
    "gated_mlp/*/{dtype}",
    "the matmuls x·W_gateᵀ, x·W_upᵀ (XLA's CPU dot at jax's default precision) and the "
    "activation return arrays of the input dtype, rounded to it before the product and the "
    "down projection.", {"float16": 5.38, "bfloat16": 9.22}) | half_intermediates(
    "fused_linear_cross_entropy/*/{dtype}",
    "composed as JAX code writes it: the logits hidden·weightᵀ (XLA's CPU dot at jax's "
    "default precision) and jax.nn.log_softmax's log-probabilities are arrays of the input "
    "dtype, rounded to it before the loss (measured: bfloat16 0.691 where the spec gives "
    "1.313).", {"bfloat16": 90.6}) | half_intermediates(
    "fused_linear_cross_entropy/vjp/{dtype}",
    "its backward runs through the same half arrays (the logits' gradient is rounded to the "
    "input dtype).", {"float16": 3.30}) | half_intermediates(
    "fused_linear_cross_entropy/forward/{dtype}",
    "composed as JAX code writes it: the logits hidden·weightᵀ (XLA's CPU dot at jax's "
    "default precision) and jax.nn.log_softmax's log-probabilities are arrays of the input "
    "dtype, rounded to it before the loss.", {"float16": 1.34}, AT_30, "0.289",
) | half_intermediates(
    "grouped_query_attention/forward/{dtype}",
    "without softcap jax.nn.dot_product_attention (XLA CPU) forms the scores with an "
    "einsum in the input dtype and, after its float32 softmax, rounds the weights to it "
    "(probs.astype(key.dtype)) before their product with V; with softcap the composition "
    "(jnp.einsum, jnp.tanh, jax.nn.softmax) works in the input dtype.", {"float16": 2.45},
    AT_30, OTHERWISE) | half_intermediates(
    "grouped_query_attention/vjp/{dtype}",
    "its backward holds the probabilities and the gradients of the scores as arrays of the "
    "input dtype.", {"float16": 20.0}, AT_30, OTHERWISE)

DEVIATIONS = with_broader_predicates(DEVIATIONS)

def rms_norm(x, weight=None, eps=1e-6):
    work = jnp.promote_types(x.dtype, jnp.float32)  # statistics in float32 at least, as Flax
    xw = x.astype(work)
    y = xw * jax.lax.rsqrt(jnp.mean(jnp.square(xw), axis=-1, keepdims=True) + eps)
    return (y if weight is None else y * weight.astype(work)).astype(x.dtype)


def rotary_embedding(x, positions, base=10000.0, interleaved=False, rotary_dim=None):
    r = rotary_dim or x.shape[-1]
    half = r // 2
    work = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    inv_freq = jnp.power(jnp.asarray(base, work), -jnp.arange(0, r, 2, dtype=work) / r)
    angle = positions.astype(work)[..., None] * inv_freq
    if angle.ndim == 3:  # [B, T, r/2] -> [B, 1, T, r/2]
        angle = angle[:, None]
    cos, sin = jnp.cos(angle).astype(x.dtype), jnp.sin(angle).astype(x.dtype)
    rot, rest = x[..., :r], x[..., r:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        turned = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
        turned = turned.reshape(*turned.shape[:-2], r)
    else:
        a, b = rot[..., :half], rot[..., half:]
        turned = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return jnp.concatenate([turned, rest], axis=-1)


_ACT = {"silu": jax.nn.silu, "gelu": lambda a: jax.nn.gelu(a, approximate=False),
        "gelu_tanh": lambda a: jax.nn.gelu(a, approximate=True)}


def gated_mlp(x, W_gate, W_up, W_down, activation="silu"):
    return (_ACT[activation](x @ W_gate.T) * (x @ W_up.T)) @ W_down.T


def _visibility(b: int, h: int, n_q: int, n_k: int, mask, is_causal: bool, q_offset, window):
    """``([B|1, h|1, L, S] visible, [L, S] signed distance j − (q_offset + i))``."""
    rel = jnp.arange(n_k)[None, :] - (q_offset + jnp.arange(n_q))[:, None]
    allow = jnp.ones((n_q, n_k), bool)
    if is_causal:
        allow = allow & (rel <= 0)
    if window is not None:
        left, right = window
        if left is not None:
            allow = allow & (rel >= -left)
        if right is not None:
            allow = allow & (rel <= right)
    allow = allow[None, None]
    if mask is not None:
        allow = allow & jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
    return jnp.broadcast_to(allow, (b, h, n_q, n_k)), rel


def grouped_query_attention(q, k, v, mask=None, is_causal=False, scale=None, q_offset=0,
                            window=None, alibi_slopes=None, softcap=None):
    b, h, n_q, e = q.shape
    g, n_k = k.shape[1], k.shape[2]
    allow, rel = _visibility(b, h, n_q, n_k, mask, is_causal, q_offset, window)
    bias = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.reshape(-1 if alibi_slopes.ndim == 1 else b, h, 1, 1)
        bias = -slopes * jnp.abs(rel).astype(q.dtype)
    if softcap is not None:
        ke, ve = jnp.repeat(k, h // g, axis=1), jnp.repeat(v, h // g, axis=1)
        s = jnp.einsum("bhle,bhse->bhls", q, ke) * (e ** -0.5 if scale is None else scale)
        s = softcap * jnp.tanh(s / softcap)
        if bias is not None:
            s = s + bias
        w = jax.nn.softmax(s, axis=-1, where=allow)
        return jnp.einsum("bhls,bhsv->bhlv", w, ve)
    ev = v.shape[-1]
    q, k, v, scale = head_dims_matched(q, k, v, scale)
    out = jax.nn.dot_product_attention(
        *(jnp.swapaxes(a, 1, 2) for a in (q, k, v)), bias=bias, mask=allow, scale=scale)
    return jnp.swapaxes(out, 1, 2)[..., :ev]


def fused_linear_cross_entropy(hidden, weight, targets, bias=None, ignore_index=-100,
                               label_smoothing=0.0, z_loss=0.0, softcap=None):
    from jax.scipy.special import logsumexp

    from lmspec.backends.jax_core import cross_entropy

    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    loss = cross_entropy(z, targets, ignore_index, label_smoothing)
    if z_loss:
        keep = targets != ignore_index
        lse = logsumexp(z, axis=-1)
        # lse·(z_loss·lse/n): every summand is at most the mean itself, so float16 overflows
        # only where the result does (lse² alone overflows from |lse| ≈ 256, and the sum
        # of the kept rows' terms before dividing by n from n·z_loss·lse² ≈ 65504)
        n = jnp.maximum(jnp.sum(keep), 1).astype(z.dtype)
        terms = lse * (z_loss * lse / n)
        loss = loss + jnp.sum(jnp.where(keep, terms, jnp.zeros_like(terms)))
    return loss
