"""Attention family on JAX's own functions.

``jax.nn.dot_product_attention`` (XLA implementation; layout ``[B, T, N, H]``, so the
contract's ``[B, h, L, E]`` is transposed at the boundary) for SDPA and inside multi-head
attention and the Transformer layers; ``jax.nn.softmax(where=mask)`` for the two
single-query attentions; ``jax.nn.standardize`` for layer norm as JAX code writes it
(``standardize(x)·γ + β``); ``jax.nn.relu`` / ``jax.nn.gelu(approximate=False)``.

Masks: the contract's and ``jax.nn.dot_product_attention``'s boolean masks both mean
"True = takes part". ``jax.nn.dot_product_attention`` fills a masked logit with a large
finite negative number, so a query that sees no key gets the *mean* of all values; the
contract asks for zeros, so the output of such a query is multiplied by 0 (see ``NOTES``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NOTES = {
    "additive_attention": "JAX has no Bahdanau attention function: composed from matmuls, "
    "jnp.tanh and jax.nn.softmax(e, where=mask) (zero weights where masked, and for a row "
    "with no valid key).",
    "dot_product_attention": "JAX has no single-query Luong attention function: "
    "jnp.einsum and jax.nn.softmax(e, where=mask).",
    "scaled_dot_product_attention": "jax.nn.dot_product_attention (implementation None = "
    "XLA) on q, k, v transposed to [B, L, h, E], with mask (broadcast to 4 axes) and "
    "is_causal passed through. Fix-up: a query that sees no key (mask and causal together "
    "leave it none) gets jax's mean of all values (masked logits are a finite "
    "-0.7·float32 max); its output is multiplied by 0, as the contract asks. Unsupported: "
    "Ev ≠ E (jax.nn.dot_product_attention requires value to have key's shape).",
    "multi_head_attention": "projections by matmul, heads as [B, L, h, D/h] into "
    "jax.nn.dot_product_attention (mask = key_valid[:, None, None, :], is_causal), the same "
    "zero fix-up for a query that sees no key, then W_o.",
    "sinusoidal_positional_encoding": "jnp.arange, jnp.power, jnp.sin, jnp.cos in the "
    "requested dtype.",
    "layer_norm": "jax.nn.standardize(x, axis=-1, epsilon=eps) * gamma + beta "
    "(standardize's default algorithm='fast': variance as mean(x²) − mean(x)², clipped at 0).",
    "transformer_encoder_layer": "composed: multi_head_attention as above, layer_norm as "
    "above, feed-forward with jax.nn.relu or jax.nn.gelu(approximate=False).",
    "transformer_decoder_layer": "composed as the encoder layer; causal self-attention "
    "(is_causal), cross-attention masked by memory_valid.",
}


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

def _sees_a_key(mask, is_causal: bool, B: int, h: int, L: int, S: int):
    """``[B, L, h, 1]``: whether query ``i`` of head ``j`` has a visible key."""
    allow = jnp.ones((B, h, L, S), bool)
    if mask is not None:
        allow = allow & jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
    if is_causal:
        allow = allow & jnp.tril(jnp.ones((L, S), bool))
    return jnp.swapaxes(jnp.any(allow, axis=-1), 1, 2)[..., None]


def _attend(q, k, v, mask, is_causal: bool, scale):
    """``jax.nn.dot_product_attention`` on ``[B, T, N, H]`` arrays, with zeros for a query
    that sees no key."""
    if mask is not None and mask.ndim < 4:
        mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal)
    if mask is None:  # causal alone (top-left) always leaves query i key 0
        return out
    B, L, h, _ = q.shape
    seen = _sees_a_key(mask, is_causal, B, h, L, k.shape[1])
    return jnp.where(seen, out, jnp.zeros_like(out))


def scaled_dot_product_attention(q, k, v, mask=None, is_causal=False, scale=None):
    if v.shape[-1] != q.shape[-1]:
        raise NotImplementedError("jax.nn.dot_product_attention requires Ev == E")
    out = _attend(*(jnp.swapaxes(a, 1, 2) for a in (q, k, v)), mask, is_causal, scale)
    return jnp.swapaxes(out, 1, 2)


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
