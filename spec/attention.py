"""Attention family: Bahdanau and Luong attention, scaled dot-product and multi-head
attention, the sinusoidal positional encoding, layer normalization and the Transformer
encoder and decoder layers.

Sources: seed 002 (attention in the encoder-decoder, self-attention with queries, keys
and values, multi-head attention, positional encoding, residual connections and layer
normalization, the Transformer encoder and decoder); Bahdanau et al. (2015); Luong et
al. (2015); Vaswani et al. (2017); Ba et al. (2016); Xiong et al. (2020) for pre-norm.

Conventions (CONTRACT §1): every mask means "True = takes part"; a query whose mask
lets no key through gets all-zero weights and a zero context (never NaN); the causal
mask is top-left (query ``i`` sees keys ``j ≤ i`` also when ``L ≠ S``) and combines with
an explicit mask by AND.

Sizes (a reading where the contract is silent): every sequence axis holds at least one
position — queries ``L``, keys ``S``, the layers' ``T`` and ``memory``'s ``S`` — and the
model width ``D`` of multi-head attention and the layers is at least 1; an empty one is a
``ValueError``. An empty batch (``B = 0``) gives an empty result. Score matrices above
``lmspec._validate.MAX_ELEMENTS`` elements are refused up front.

Each forward is written as ``_*_fwd(...) -> (output, pullback)``: the pullback is the
hand-derived vector-Jacobian product of that block, closed over the forward's
intermediates. The public ops return the output; their ``@vjp_rule`` calls the
pullback. The Transformer layers compose the pullbacks of their blocks (attention,
layer norm, linear, ReLU/GELU), which are each derived by hand below.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _validate as v
from ._catalogue import reference, vjp_rule
from ._precision import DTYPES, activation, fl
from .blocks import (
    activation_forward,
    attend,
    causal,
    linear,
)

Pullback = Callable[..., Any]
_MHA_PARAMS = ("W_q", "W_k", "W_v", "b_q", "b_k", "b_v", "W_o", "b_o")

# -- building blocks -------------------------------------------------------------------


def _and(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return b
    return a if b is None else a & b


def _sdpa_fwd(q, k, v_, allow, scale: float):
    """``O = softmax_masked(scale · Q Kᵀ) V``. Pullback ``∂O -> (∂Q, ∂K, ∂V)`` with
    ``∂V = Pᵀ ∂O``, ``∂S = P ⊙ (∂O Vᵀ − rowsum)``, ``∂Q = scale·∂S K``,
    ``∂K = scale·∂Sᵀ Q``."""
    s = q @ np.swapaxes(k, -1, -2)
    s *= scale
    (out, _), attend_back = attend(s, allow, v_, overwrite=True)

    def back(d_out):
        ds, dv = attend_back(d_out)
        dq, dk = ds @ k, np.swapaxes(ds, -1, -2) @ q
        dq *= scale
        dk *= scale
        return dq, dk, dv

    return out, back


def _split_heads(x: np.ndarray, h: int) -> np.ndarray:
    """``[B, T, D] -> [B, h, T, D/h]``: head ``j`` takes features ``j·D/h … (j+1)·D/h``."""
    b, t, d = x.shape
    return x.reshape(b, t, h, d // h).transpose(0, 2, 1, 3)


def _merge_heads(x: np.ndarray) -> np.ndarray:
    """``[B, h, T, dh] -> [B, T, h·dh]`` (heads concatenated in order)."""
    b, h, t, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * dh)


def _mha_fwd(query, key, value, params: Sequence[np.ndarray], h: int, allow):
    """Multi-head attention (Vaswani et al. 2017, seed 002):
    ``head_j = SDPA(Q_j, K_j, V_j)`` with ``Q = query W_qᵀ + b_q`` (likewise ``K``, ``V``),
    ``out = concat_j(head_j) W_oᵀ + b_o``; ``allow`` broadcasts to ``[B, h, L, S]``.
    Pullback: ``∂out -> (∂query, ∂key, ∂value, (∂W_q, ∂W_k, ∂W_v, ∂b_q, ∂b_k, ∂b_v, ∂W_o,
    ∂b_o))``."""
    W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o = params
    (Q, bq), (K, bk), (V, bv) = (linear(a, W, b) for a, W, b in
                                 ((query, W_q, b_q), (key, W_k, b_k), (value, W_v, b_v)))
    dh = query.shape[-1] // h
    heads, b_att = _sdpa_fwd(_split_heads(Q, h), _split_heads(K, h), _split_heads(V, h),
                             allow, 1.0 / math.sqrt(dh))
    out, b_out = linear(_merge_heads(heads), W_o, b_o)

    def back(d_out):
        d_cat, dW_o, db_o = b_out(d_out)
        dq, dk, dv = (_merge_heads(g) for g in b_att(_split_heads(d_cat, h)))
        (dx_q, dW_q, db_q), (dx_k, dW_k, db_k), (dx_v, dW_v, db_v) = bq(dq), bk(dk), bv(dv)
        return dx_q, dx_k, dx_v, (dW_q, dW_k, dW_v, db_q, db_k, db_v, dW_o, db_o)

    return out, back


def _layer_norm_fwd(x, gamma, beta, eps: float):
    """``y = γ ⊙ (x − μ)/√(σ² + ε) + β`` over the last axis, ``σ²`` the biased variance
    (Ba et al. 2016). Pullback, with ``x̂ = (x − μ)/σ̃`` and ``g = ∂y ⊙ γ``:
    ``∂x = (g − mean(g) − x̂ · mean(g ⊙ x̂)) / σ̃``, ``∂γ = Σ ∂y ⊙ x̂``, ``∂β = Σ ∂y``."""
    mu = np.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    sigma = np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + eps)
    xhat = xc / sigma

    def back(dy):
        lead = tuple(range(dy.ndim - 1))
        g = dy * gamma
        dx = (g - np.mean(g, axis=-1, keepdims=True)
              - xhat * np.mean(g * xhat, axis=-1, keepdims=True)) / sigma
        return dx, np.sum(dy * xhat, axis=lead), np.sum(dy, axis=lead)

    y = xhat * gamma
    y += beta
    return y, back


def _ffn_fwd(x, params: Sequence[np.ndarray], activation: str):
    """``FFN(x) = W_2 act(W_1 x + b_1) + b_2``. Pullback ``-> (∂x, (∂W_1, ∂b_1, ∂W_2,
    ∂b_2))``."""
    W_1, b_1, W_2, b_2 = params
    a, b1 = linear(x, W_1, b_1)
    z, b_act = activation_forward(a, activation)
    y, b2 = linear(z, W_2, b_2)

    def back(dy):
        dz, dW_2, db_2 = b2(dy)
        dx, dW_1, db_1 = b1(b_act(dz))
        return dx, (dW_1, db_1, dW_2, db_2)

    return y, back


Block = Callable[[np.ndarray], tuple[np.ndarray, Pullback]]


def _sublayer_fwd(x, block: Block, norm: Sequence[np.ndarray], norm_first: bool, eps: float):
    """A residual sub-layer (He et al. 2016, seed 002): post-norm ``LN(x + f(x))`` or
    pre-norm ``x + f(LN(x))``. ``block(z) -> (f(z), pullback ∂f -> (∂z, grads))``.
    Pullback: ``∂y -> (∂x, grads of f, (∂γ, ∂β))``."""
    gamma, beta = norm
    if norm_first:
        z, b_ln = _layer_norm_fwd(x, gamma, beta, eps)
        f, b_f = block(z)

        def back(dy):
            dz, grads = b_f(dy)
            dx_ln, dg, db = b_ln(dz)
            return dy + dx_ln, grads, (dg, db)

        return x + f, back
    f, b_f = block(x)
    y, b_ln = _layer_norm_fwd(x + f, gamma, beta, eps)

    def back_post(dy):
        ds, dg, db = b_ln(dy)
        dx_f, grads = b_f(ds)
        return ds + dx_f, grads, (dg, db)

    return y, back_post


def _self_attention(params, h: int, allow) -> Block:
    def block(z):
        out, back = _mha_fwd(z, z, z, params, h, allow)

        def b(d):
            dq, dk, dv, grads = back(d)
            dq += dk
            dq += dv
            return dq, grads

        return out, b

    return block


def _cross_attention(memory, params, h: int, allow) -> Block:
    """Queries from the decoder, keys and values from ``memory``; ``∂memory`` is handed
    back first among the grads."""
    def block(z):
        out, back = _mha_fwd(z, memory, memory, params, h, allow)

        def b(d):
            dq, dk, dv, grads = back(d)
            return dq, (dk + dv, *grads)

        return out, b

    return block


def _feed_forward(params, activation: str) -> Block:
    return lambda z: _ffn_fwd(z, params, activation)


def _key_allow(valid: np.ndarray | None) -> np.ndarray | None:
    """``[B, S]`` key mask as a ``[B, 1, 1, S]`` attention mask."""
    return None if valid is None else valid[:, None, None, :]


# -- validation ------------------------------------------------------------------------



def _check_single_query(op, query, keys, values, mask, *, same_dim: bool):
    q = v.floats(op, "query", query, ndim=2)
    b = q.shape[0]
    k = v.floats(op, "keys", keys, shape=(b, None, q.shape[1] if same_dim else None))
    v.positive_dims(op, "keys", k, {1: "S"})
    vals = v.floats(op, "values", values, shape=(b, k.shape[1], None))
    m = v.mask(op, "mask", mask, shape=(b, k.shape[1]))
    return q, k, vals, m


def _check_sdpa(q, k, v_, mask, is_causal, scale):
    op = "scaled_dot_product_attention"
    q = v.floats(op, "q", q, ndim=4)
    b, h, n_q, e = q.shape
    k = v.floats(op, "k", k, shape=(b, h, None, e))
    vv = v.floats(op, "v", v_, shape=(b, h, k.shape[2], None))
    v.positive_dims(op, "q", q, {2: "L"})
    v.positive_dims(op, "k", k, {2: "S"})
    full = (b, h, n_q, k.shape[2])
    v.budget(op, "k", math.prod(full), "score matrix [B, h, L, S]")
    m = v.scores_mask(op, mask, full)
    causal_on = v.flag(op, "is_causal", is_causal)
    scale = v.default_scale(op, q, scale)
    s = v.real(op, "scale", scale, finite=True)
    allow = _and(m, causal(n_q, k.shape[2]) if causal_on else None)
    return q, k, vv, allow, s


def _check_attention_params(op: str, params, d: int, where: str = ""):
    """The 8 arrays of an attention block, ``(W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o)``."""
    if not isinstance(params, (tuple, list)) or len(params) != 8:
        v.fail(op, where or "params", "8 arrays (W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o)",
               f"{len(params) if isinstance(params, (tuple, list)) else type(params).__name__}")
    shapes = [(d, d)] * 3 + [(d,)] * 3 + [(d, d), (d,)]
    return tuple(v.floats(op, f"{where} {n}".strip(), p, shape=s)
                 for n, p, s in zip(_MHA_PARAMS, params, shapes, strict=True))


def _check_heads(op: str, num_heads, d: int) -> int:
    h = v.integer(op, "num_heads", num_heads, low=1)
    if d % h:
        v.fail(op, "num_heads", f"a divisor of the model width D={d}", repr(num_heads))
    return h


def _check_mha(query, key, value, params, num_heads, key_valid, is_causal):
    op = "multi_head_attention"
    qx = v.floats(op, "query", query, ndim=3)
    b, n_q, d = qx.shape
    v.positive_dims(op, "query", qx, {1: "L", 2: "D"})
    kx = v.floats(op, "key", key, shape=(b, None, d))
    v.positive_dims(op, "key", kx, {1: "S"})
    vx = v.floats(op, "value", value, shape=kx.shape)
    ps = _check_attention_params(op, params, d)
    h = _check_heads(op, num_heads, d)
    v.budget(op, "key", b * h * n_q * kx.shape[1], "score matrix [B, h, L, S]")
    kv = v.mask(op, "key_valid", key_valid, shape=(b, kx.shape[1]))
    causal_on = v.flag(op, "is_causal", is_causal)
    allow = _and(_key_allow(kv), causal(n_q, kx.shape[1]) if causal_on else None)
    return qx, kx, vx, ps, h, allow


def _check_layer(op, x, weights, num_heads, norm_first, activation, eps, n_attn, n_norm):
    """Validate a Transformer layer's ``x`` and flat ``weights`` tuple; return
    ``(x, attention param tuples, ffn params, norm params, h, norm_first, eps)``."""
    xx = v.floats(op, "x", x, ndim=3)
    v.positive_dims(op, "x", xx, {1: "T", 2: "D"})
    d = xx.shape[2]
    want = 8 * n_attn + 4 + 2 * n_norm
    if not isinstance(weights, (tuple, list)) or len(weights) != want:
        got = len(weights) if isinstance(weights, (tuple, list)) else type(weights).__name__
        v.fail(op, "weights", f"a flat tuple of {want} arrays", got)
    attn = tuple(_check_attention_params(op, weights[8 * i:8 * i + 8], d,
                                         f"weights[{8 * i}:{8 * i + 8}]") for i in range(n_attn))
    o = 8 * n_attn
    W_1 = v.floats(op, f"weights[{o}] (W_1)", weights[o], shape=(None, d))
    f = W_1.shape[0]
    ffn = (W_1, v.floats(op, f"weights[{o + 1}] (b_1)", weights[o + 1], shape=(f,)),
           v.floats(op, f"weights[{o + 2}] (W_2)", weights[o + 2], shape=(d, f)),
           v.floats(op, f"weights[{o + 3}] (b_2)", weights[o + 3], shape=(d,)))
    o += 4
    norms = tuple((v.floats(op, f"weights[{o + 2 * i}] (gamma)", weights[o + 2 * i], shape=(d,)),
                   v.floats(op, f"weights[{o + 2 * i + 1}] (beta)", weights[o + 2 * i + 1],
                            shape=(d,))) for i in range(n_norm))
    h = _check_heads(op, num_heads, d)
    v.budget(op, "x", xx.shape[0] * h * xx.shape[1] ** 2, "self-attention scores [B, h, T, T]")
    v.budget(op, "weights", xx.shape[0] * xx.shape[1] * f, "feed-forward hidden [B, T, F]")
    nf = v.flag(op, "norm_first", norm_first)
    v.one_of(op, "activation", activation, ("relu", "gelu"))
    e = v.real(op, "eps", eps, low=0.0)
    return xx, attn, ffn, norms, h, nf, e


# -- single-query attention (Bahdanau, Luong) --------------------------------------------


def _single_query_fwd(e, mask, values):
    """Scores ``e[B, S]`` of one query -> ``(context[B, Dv], weights[B, S])`` and the
    pullback ``(∂context, ∂weights) -> (∂e, ∂values)``."""
    (ctx, w), back = attend(e[:, None, :], None if mask is None else mask[:, None, :],
                                 values)

    def pull(cot):
        d_ctx, d_w = (fl(c) for c in cot)
        de, dvals = back(d_ctx[:, None, :], d_w[:, None, :])
        return de[:, 0, :], dvals

    return (ctx[:, 0, :], w[:, 0, :]), pull


def _additive_fwd(query, keys, values, W_q, W_k, v_, mask):
    op = "additive_attention"
    q, k, vals, m = _check_single_query(op, query, keys, values, mask, same_dim=False)
    vv = v.floats(op, "v", v_, ndim=1)
    v.positive_dims(op, "query", q, {1: "Dq"})
    v.positive_dims(op, "keys", k, {2: "Dk"})
    v.positive_dims(op, "v", vv, {0: "A"})
    Wq = v.floats(op, "W_q", W_q, shape=(vv.shape[0], q.shape[1]))
    Wk = v.floats(op, "W_k", W_k, shape=(vv.shape[0], k.shape[2]))
    u, b_u = linear(q, Wq, None)
    kk, b_k = linear(k, Wk, None)
    t = activation(np.tanh(u[:, None, :] + kk))
    out, b_att = _single_query_fwd(t @ vv, m, vals)

    def back(cot):
        de, dvals = b_att(cot)
        dz = de[:, :, None] * vv * (1 - t * t)
        dq, dWq, _ = b_u(np.sum(dz, axis=1))
        dk, dWk, _ = b_k(dz)
        return {"query": dq, "keys": dk, "values": dvals, "W_q": dWq, "W_k": dWk,
                "v": np.einsum("bs,bsa->a", de, t)}

    return out, back


@reference("attention", diff=("query", "keys", "values", "W_q", "W_k", "v"))
def additive_attention(query, keys, values, W_q, W_k, v, mask=None):
    """Bahdanau (additive) attention of one query per batch row (seed 002; Bahdanau et
    al. 2015):

    ``e_s = vᵀ tanh(W_q q + W_k k_s)``, ``α = softmax_masked(e)``, ``context = Σ_s α_s
    values_s``. Returns ``(context[B, Dv], weights[B, S])``; a row with no valid key
    gives zero weights and a zero context. ``S``, ``Dq``, ``Dk`` and ``A`` are at least 1.
    """
    out, _ = _additive_fwd(query, keys, values, W_q, W_k, v, mask)
    return out


@vjp_rule(additive_attention)
def _additive_attention_vjp(cot, query, keys, values, W_q, W_k, v, mask=None):
    """With ``∂e = softmax pullback of (∂α + values ∂context)`` and
    ``∂z_s = ∂e_s · v ⊙ (1 − tanh²)``: ``∂q = W_qᵀ Σ_s ∂z_s``, ``∂k_s = W_kᵀ ∂z_s``,
    ``∂W_q = Σ_b (Σ_s ∂z_s) qᵀ``, ``∂W_k = Σ ∂z_s k_sᵀ``, ``∂v = Σ ∂e_s tanh(·)``,
    ``∂values_s = α_s ∂context``."""
    _, back = _additive_fwd(query, keys, values, W_q, W_k, v, mask)
    return back(cot)


def _dot_fwd(query, keys, values, mask):
    q, k, vals, m = _check_single_query("dot_product_attention", query, keys, values, mask,
                                        same_dim=True)
    out, b_att = _single_query_fwd(np.einsum("bd,bsd->bs", q, k), m, vals)

    def back(cot):
        de, dvals = b_att(cot)
        return {"query": np.einsum("bs,bsd->bd", de, k), "keys": de[:, :, None] * q[:, None, :],
                "values": dvals}

    return out, back


@reference("attention", diff=("query", "keys", "values"))
def dot_product_attention(query, keys, values, mask=None):
    """Luong (dot-product, unscaled) attention of one query per batch row (seed 002;
    Luong et al. 2015): ``e_s = q · k_s``, ``α = softmax_masked(e)``,
    ``context = Σ_s α_s values_s``. Returns ``(context[B, Dv], weights[B, S])``.
    """
    out, _ = _dot_fwd(query, keys, values, mask)
    return out


@vjp_rule(dot_product_attention)
def _dot_product_attention_vjp(cot, query, keys, values, mask=None):
    """``∂q = Σ_s ∂e_s k_s``, ``∂k_s = ∂e_s q``, ``∂values_s = α_s ∂context``, with ``∂e``
    the softmax pullback of ``∂α + values ∂context``."""
    _, back = _dot_fwd(query, keys, values, mask)
    return back(cot)


# -- scaled dot-product and multi-head attention -----------------------------------------


@reference("attention", diff=("q", "k", "v"))
def scaled_dot_product_attention(q, k, v, mask=None, is_causal=False, scale=None):
    """``O = softmax_masked(scale · Q Kᵀ) V`` per batch and head (Vaswani et al. 2017,
    seed 002). Shapes ``q[B,h,L,E]``, ``k[B,h,S,E]``, ``v[B,h,S,Ev]`` -> ``[B,h,L,Ev]``.

    ``scale`` defaults to ``1/√E``. ``mask`` is any bool shape broadcasting to
    ``[B,h,L,S]`` (``[S]``, ``[L,S]``, ``[B,1,1,S]``, …); ``is_causal`` lets query ``i``
    see keys ``j ≤ i`` (top-left, also when ``L ≠ S``); both combine by AND. A query that
    sees no key outputs zeros. Readings chosen where the contract is silent: ``scale`` may be
    any finite real number (zero and negative included, CONTRACT §6); ``mask`` has at most 4
    axes and must broadcast to exactly ``[B,h,L,S]``; ``L ≥ 1`` and ``S ≥ 1``.
    """
    qq, kk, vv, allow, s = _check_sdpa(q, k, v, mask, is_causal, scale)
    out, _ = _sdpa_fwd(qq, kk, vv, allow, s)
    return out


@vjp_rule(scaled_dot_product_attention)
def _sdpa_vjp(cot, q, k, v, mask=None, is_causal=False, scale=None):
    """``∂V = Pᵀ ∂O``, ``∂S = P ⊙ (∂O Vᵀ − rowsum(P ⊙ ∂O Vᵀ))``, ``∂Q = scale · ∂S K``,
    ``∂K = scale · ∂Sᵀ Q``."""
    qq, kk, vv, allow, s = _check_sdpa(q, k, v, mask, is_causal, scale)
    _, back = _sdpa_fwd(qq, kk, vv, allow, s)
    dq, dk, dv = back(fl(cot))
    return {"q": dq, "k": dk, "v": dv}


@reference("attention", diff=("query", "key", "value", *_MHA_PARAMS))
def multi_head_attention(query, key, value, W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o,
                         num_heads, key_valid=None, is_causal=False):
    """``MHA = concat_j(head_j) W_oᵀ + b_o``, ``head_j = SDPA(Q_j, K_j, V_j)`` with scale
    ``1/√(D/h)``, ``Q = query W_qᵀ + b_q`` (likewise ``K``, ``V``); head ``j`` uses
    features ``j·D/h … (j+1)·D/h`` (seed 002; Vaswani et al. 2017). ``key_valid[B,S]``
    masks keys; ``is_causal`` is top-left. A query that sees no key contributes zeros
    before ``W_o`` (its output is ``b_o``). Returns ``[B, L, D]``.
    """
    qx, kx, vx, ps, h, allow = _check_mha(query, key, value,
                                          (W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o),
                                          num_heads, key_valid, is_causal)
    out, _ = _mha_fwd(qx, kx, vx, ps, h, allow)
    return out


@vjp_rule(multi_head_attention)
def _multi_head_attention_vjp(cot, query, key, value, W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o,
                              num_heads, key_valid=None, is_causal=False):
    """The linear pullbacks around the SDPA pullback of each head (see ``_mha_fwd``)."""
    qx, kx, vx, ps, h, allow = _check_mha(query, key, value,
                                          (W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o),
                                          num_heads, key_valid, is_causal)
    _, back = _mha_fwd(qx, kx, vx, ps, h, allow)
    dq, dk, dv, grads = back(fl(cot))
    return {"query": dq, "key": dk, "value": dv, **dict(zip(_MHA_PARAMS, grads, strict=True))}


# -- positional encoding and layer norm --------------------------------------------------


@reference("attention")
def sinusoidal_positional_encoding(length, d_model, base=10000.0, dtype="float64"):
    """``PE[p, 2i] = sin(p / base^(2i/d))``, ``PE[p, 2i+1] = cos(p / base^(2i/d))``
    (Vaswani et al. 2017; seed 002: positions added to the input encodings), interleaved.

    ``dtype`` names the precision a backend should answer in; the reference itself
    computes in its working precision (float64, or the dtype under test when the harness
    evaluates the spec as its baseline). ``d_model`` must be even; ``length = 0`` or
    ``d_model = 0`` gives an empty array; more than ``MAX_ELEMENTS`` (2**28) elements in all is
    a ``ValueError``.
    """
    op = "sinusoidal_positional_encoding"
    n = v.integer(op, "length", length, low=0)
    d = v.integer(op, "d_model", d_model, low=0)
    if d % 2:
        v.fail(op, "d_model", "an even int", repr(d_model))
    b = v.real(op, "base", base, low=0.0, low_open=True)
    v.one_of(op, "dtype", dtype, tuple(DTYPES))
    v.budget(op, "length" if n >= d else "d_model", max(n * d, n, d), "output [length, d_model]")
    pos = fl(np.arange(n))[:, None]
    inv_freq = fl(b) ** (-fl(np.arange(0, d, 2)) / fl(d))
    angle = pos * inv_freq
    pe = np.empty((n, d), dtype=angle.dtype)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle)
    return pe


def _check_ln(x, gamma, beta, eps):
    op = "layer_norm"
    xx = v.floats(op, "x", x, min_ndim=1)
    d = xx.shape[-1]
    return (xx, v.floats(op, "gamma", gamma, shape=(d,)), v.floats(op, "beta", beta, shape=(d,)),
            v.real(op, "eps", eps, low=0.0))


@reference("attention", diff=("x", "gamma", "beta"))
def layer_norm(x, gamma, beta, eps=1e-5):
    """``y = γ ⊙ (x − μ) / √(σ² + ε) + β`` over the last axis, ``μ`` the mean and
    ``σ²`` the biased (1/D) variance, ``ε`` inside the square root (Ba et al. 2016;
    seed 002). ``x`` may have any number of leading axes; ``ε ≥ 0`` (with ``ε = 0`` a
    constant row gives NaN, 0/0)."""
    y, _ = _layer_norm_fwd(*_check_ln(x, gamma, beta, eps))
    return y


@vjp_rule(layer_norm)
def _layer_norm_vjp(cot, x, gamma, beta, eps=1e-5):
    """``∂x = (g − mean(g) − x̂ mean(g ⊙ x̂)) / √(σ² + ε)`` with ``g = ∂y ⊙ γ``;
    ``∂γ = Σ ∂y ⊙ x̂``, ``∂β = Σ ∂y`` (sums over every axis but the last)."""
    _, back = _layer_norm_fwd(*_check_ln(x, gamma, beta, eps))
    dx, dg, db = back(fl(cot))
    return {"x": dx, "gamma": dg, "beta": db}


# -- Transformer layers ------------------------------------------------------------------


def _encoder_fwd(x, weights, num_heads, key_valid, is_causal, norm_first, activation, eps):
    op = "transformer_encoder_layer"
    xx, (attn,), ffn, (n1, n2), h, nf, e = _check_layer(
        op, x, weights, num_heads, norm_first, activation, eps, 1, 2)
    kv = v.mask(op, "key_valid", key_valid, shape=xx.shape[:2])
    t = xx.shape[1]
    allow = _and(_key_allow(kv), causal(t, t) if v.flag(op, "is_causal", is_causal) else None)
    y1, b1 = _sublayer_fwd(xx, _self_attention(attn, h, allow), n1, nf, e)
    y2, b2 = _sublayer_fwd(y1, _feed_forward(ffn, activation), n2, nf, e)

    def back(dy):
        dy1, g_ffn, g_n2 = b2(fl(dy))
        dx, g_attn, g_n1 = b1(dy1)
        return {"x": dx, "weights": (*g_attn, *g_ffn, *g_n1, *g_n2)}

    return y2, back


@reference("attention", diff=("x", "weights"))
def transformer_encoder_layer(x, weights, num_heads, key_valid=None, is_causal=False,
                              norm_first=False, activation="relu", eps=1e-5):
    """One Transformer encoder layer (Vaswani et al. 2017; seed 002):
    post-norm ``x₁ = LN₁(x + SA(x))``, ``y = LN₂(x₁ + FFN(x₁))``; pre-norm
    ``x₁ = x + SA(LN₁(x))``, ``y = x₁ + FFN(LN₂(x₁))``.

    ``SA`` is :func:`multi_head_attention` of ``x`` with itself (``key_valid`` masks
    keys, ``is_causal`` top-left); ``FFN(z) = W_2 act(W_1 z + b_1) + b_2`` with
    ``act`` ReLU or exact GELU. ``weights = (W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o,
    W_1, b_1, W_2, b_2, γ₁, β₁, γ₂, β₂)``. No dropout.
    """
    y, _ = _encoder_fwd(x, weights, num_heads, key_valid, is_causal, norm_first, activation,
                        eps)
    return y


@vjp_rule(transformer_encoder_layer)
def _transformer_encoder_layer_vjp(cot, x, weights, num_heads, key_valid=None, is_causal=False,
                                   norm_first=False, activation="relu", eps=1e-5):
    """Composition of the hand-derived pullbacks of layer norm, the residual sum,
    multi-head attention, the linear maps and the activation."""
    _, back = _encoder_fwd(x, weights, num_heads, key_valid, is_causal, norm_first, activation,
                           eps)
    return back(cot)


def _decoder_fwd(x, memory, weights, num_heads, memory_valid, norm_first, activation, eps):
    op = "transformer_decoder_layer"
    xx, (sa, ca), ffn, (n1, n2, n3), h, nf, e = _check_layer(
        op, x, weights, num_heads, norm_first, activation, eps, 2, 3)
    mem = v.floats(op, "memory", memory, shape=(xx.shape[0], None, xx.shape[2]))
    v.positive_dims(op, "memory", mem, {1: "S"})
    v.budget(op, "memory", xx.shape[0] * h * xx.shape[1] * mem.shape[1],
             "cross-attention scores [B, h, T, S]")
    mv = v.mask(op, "memory_valid", memory_valid, shape=mem.shape[:2])
    t = xx.shape[1]
    y1, b1 = _sublayer_fwd(xx, _self_attention(sa, h, causal(t, t)), n1, nf, e)
    y2, b2 = _sublayer_fwd(y1, _cross_attention(mem, ca, h, _key_allow(mv)), n2, nf, e)
    y3, b3 = _sublayer_fwd(y2, _feed_forward(ffn, activation), n3, nf, e)

    def back(dy):
        dy2, g_ffn, g_n3 = b3(fl(dy))
        dy1, (dmem, *g_ca), g_n2 = b2(dy2)
        dx, g_sa, g_n1 = b1(dy1)
        return {"x": dx, "memory": dmem,
                "weights": (*g_sa, *g_ca, *g_ffn, *g_n1, *g_n2, *g_n3)}

    return y3, back


@reference("attention", diff=("x", "memory", "weights"))
def transformer_decoder_layer(x, memory, weights, num_heads, memory_valid=None,
                              norm_first=False, activation="relu", eps=1e-5):
    """One Transformer decoder layer (Vaswani et al. 2017; seed 002): causal
    self-attention, cross-attention to ``memory`` (``memory_valid`` masks its keys), then
    the feed-forward block, each a residual sub-layer, post-norm ``LN(x + f(x))`` or
    pre-norm ``x + f(LN(x))`` as in :func:`transformer_encoder_layer`.

    ``weights = (self-attention 8, cross-attention 8, W_1, b_1, W_2, b_2, γ₁, β₁, γ₂, β₂,
    γ₃, β₃)``. No dropout. The self-attention has no padding mask (the contract gives
    none): only the causal one.
    """
    y, _ = _decoder_fwd(x, memory, weights, num_heads, memory_valid, norm_first, activation,
                        eps)
    return y


@vjp_rule(transformer_decoder_layer)
def _transformer_decoder_layer_vjp(cot, x, memory, weights, num_heads, memory_valid=None,
                                   norm_first=False, activation="relu", eps=1e-5):
    """Composition of the block pullbacks; ``∂memory`` sums the key and value paths of
    the cross-attention."""
    _, back = _decoder_fwd(x, memory, weights, num_heads, memory_valid, norm_first, activation,
                           eps)
    return back(cot)
