"""The suite catches realistic bugs in the attention family (mutation testing).

Each mutant is torch-cpu's own implementation with one realistic bug; everything else
delegates to the real backend functions, so a failure can only come from the bug.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")

import torch
import torch.nn.functional as F
from torch import nn

from lmspec.backends import torch_attention as ta


def _as_4d(mask):
    return None if mask is None else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _sdpa_with_causal(diagonal_of):
    """SDPA whose causal mask is ``tril(diagonal=diagonal_of(L, S))`` (0 is the spec's)."""

    def sdpa(q, k, v, mask=None, is_causal=False, scale=None):
        mask = _as_4d(mask)
        if is_causal:
            n_q, n_k = q.shape[-2], k.shape[-2]
            causal = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal_of(n_q, n_k))
            mask = causal if mask is None else mask & causal
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    return sdpa


sdpa_causal_without_diagonal = _sdpa_with_causal(lambda n_q, n_k: -1)
sdpa_causal_bottom_right = _sdpa_with_causal(lambda n_q, n_k: n_k - n_q)


def sdpa_scale_one_over_e(q, k, v, mask=None, is_causal=False, scale=None):
    return ta.scaled_dot_product_attention(q, k, v, mask, is_causal,
                                           1.0 / q.shape[-1] if scale is None else scale)


def sdpa_nan_on_fully_masked_rows(q, k, v, mask=None, is_causal=False, scale=None):
    """The textbook masked_fill(-inf) + softmax: 0/0 = NaN where a row allows nothing."""
    s = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    allow = torch.ones(s.shape[-2:], dtype=torch.bool)
    if is_causal:
        allow = allow.tril()
    if mask is not None:
        allow = allow & _as_4d(mask)
    return torch.softmax(s.masked_fill(~allow, float("-inf")), dim=-1) @ v


def mha_wrong_head_split(query, key, value, W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o,
                         num_heads, key_valid=None, is_causal=False):
    """Heads take every h-th feature (view as [.., D/h, h]) instead of contiguous blocks."""
    def split(x):
        b, t, d = x.shape
        return x.reshape(b, t, d // num_heads, num_heads).permute(0, 3, 1, 2)

    def merge(x):
        b, h, t, dh = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, t, h * dh)

    q, k, v = (split(F.linear(x, W, b)) for x, W, b in
               ((query, W_q, b_q), (key, W_k, b_k), (value, W_v, b_v)))
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = ta.scaled_dot_product_attention(q, k, v, mask, is_causal)
    return F.linear(merge(out), W_o, b_o)


def pe_sin_cos_swapped(length, d_model, base=10000.0, dtype="float64"):
    pe = ta.sinusoidal_positional_encoding(length, d_model, base, dtype)
    return pe.reshape(length, d_model // 2, 2).flip(-1).reshape(length, d_model)


def layer_norm_unbiased_variance(x, gamma, beta, eps=1e-5):
    mu = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, correction=1)
    return (x - mu) / torch.sqrt(var + eps) * gamma + beta


def layer_norm_eps_outside_sqrt(x, gamma, beta, eps=1e-5):
    mu = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, correction=0)
    return (x - mu) / (torch.sqrt(var) + eps) * gamma + beta


def encoder_always_pre_norm(x, weights, num_heads, key_valid=None, is_causal=False,
                            norm_first=False, activation="relu", eps=1e-5):
    return ta.transformer_encoder_layer(x, weights, num_heads, key_valid, is_causal, True,
                                        activation, eps)


def encoder_tanh_gelu(x, weights, num_heads, key_valid=None, is_causal=False,
                      norm_first=False, activation="relu", eps=1e-5):
    if activation != "gelu":
        return ta.transformer_encoder_layer(x, weights, num_heads, key_valid, is_causal,
                                            norm_first, activation, eps)
    d, t = x.shape[2], x.shape[1]
    layer = nn.TransformerEncoderLayer(
        d, num_heads, weights[8].shape[0], 0.0, lambda z: F.gelu(z, approximate="tanh"), eps,
        batch_first=True, norm_first=norm_first, dtype=x.dtype).eval()
    params = ta._attention_params("self_attn", weights[:8]) | ta._ffn_and_norm_params(
        weights[8:12], ta._pairs(weights[12:16]))
    kwargs = {"src_key_padding_mask": None if key_valid is None else ~key_valid}
    if is_causal:
        kwargs |= {"src_mask": ~torch.ones(t, t, dtype=torch.bool).tril(), "is_causal": True}
    return torch.func.functional_call(layer, params, (x,), kwargs)


MUTANTS = {
    "SDPA default scale 1/E": ("scaled_dot_product_attention", sdpa_scale_one_over_e),
    "causal mask without the diagonal": ("scaled_dot_product_attention",
                                         sdpa_causal_without_diagonal),
    "bottom-right causal when L != S": ("scaled_dot_product_attention",
                                        sdpa_causal_bottom_right),
    "NaN on fully masked rows": ("scaled_dot_product_attention", sdpa_nan_on_fully_masked_rows),
    "wrong head split": ("multi_head_attention", mha_wrong_head_split),
    "sin/cos swapped in PE": ("sinusoidal_positional_encoding", pe_sin_cos_swapped),
    "unbiased variance in layer norm": ("layer_norm", layer_norm_unbiased_variance),
    "eps outside the square root": ("layer_norm", layer_norm_eps_outside_sqrt),
    "pre-norm when post-norm was asked": ("transformer_encoder_layer", encoder_always_pre_norm),
    "tanh-approximate GELU": ("transformer_encoder_layer", encoder_tanh_gelu),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(run_mutant, name):
    op, fn = MUTANTS[name]
    results = run_mutant(op, fn, dtypes=("float64",), checks=("forward",), max_examples=60)
    failing = [r for r in results if r["status"] == "fail"]
    assert failing, f"{name} went unnoticed: {[(r['check'], r['status']) for r in results]}"
    assert all(r["op"] == op for r in failing)
    assert failing[0]["counterexample"] is not None and failing[0]["reproduce"]


def test_eps_outside_sqrt_is_caught_in_float32(run_mutant):
    """eps inside vs outside the root differs by ~ε/σ relatively: visible in float32 too."""
    results = run_mutant("layer_norm", layer_norm_eps_outside_sqrt, dtypes=("float32",),
                         checks=("forward",), max_examples=60)
    assert [r["status"] for r in results] == ["fail"]
