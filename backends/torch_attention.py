"""Attention family on torch's own kernels.

``F.scaled_dot_product_attention`` (on CUDA: the flash / memory-efficient kernels
where they apply), ``F.multi_head_attention_forward``, ``F.layer_norm``, and
``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` in eval mode with
dropout 0, their parameters swapped in with ``torch.func.functional_call`` so that
autograd reaches the caller's tensors. The forward runs under ``torch.no_grad()`` (the
generic wrapper), which lets ``nn.TransformerEncoderLayer`` take torch's inference
fast path (``torch._transformer_encoder_layer_fwd``); the vjp runs with autograd and
takes the ordinary path, so both are checked.

Masks: the contract's masks mean "True = takes part", as SDPA's boolean ``attn_mask``
does; the boolean masks of ``nn.MultiheadAttention`` and the Transformer layers mean
the opposite ("True = masked out") and are passed negated.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lmspec.backends.torch_backend import device, torch_dtype

NOTES = {
    "additive_attention": "torch has no Bahdanau attention kernel: composed from F.linear, "
    "torch.tanh, torch.softmax and torch.bmm (a row with no valid key is given zero weights "
    "by multiplying the softmax by the mask).",
    "dot_product_attention": "torch has no single-query Luong attention kernel: composed from "
    "torch.bmm and torch.softmax (zero weights for a row with no valid key as above).",
    "scaled_dot_product_attention": "F.scaled_dot_product_attention; mask and causal are "
    "combined into one boolean attn_mask (torch rejects both at once); is_causal alone is "
    "passed as torch's is_causal (top-left). Fix-up: with is_causal=True and a negative "
    "scale, torch 2.13's CPU flash kernel (E == Ev) returns NaN for every query row that has "
    "masked-out keys (measured: L=1, S=2, scale=-0.5 gives NaN; the math kernel and an "
    "explicit tril attn_mask give the right answer), so for a negative scale the causal mask "
    "is passed as an explicit attn_mask. A mask of fewer than 4 axes is reshaped with "
    "leading unit axes first (torch raises IndexError for a 1-d [S] mask, which the contract "
    "allows).",
    "multi_head_attention": "F.multi_head_attention_forward with separate projection weights, "
    "need_weights=False (so it runs SDPA); key_padding_mask = ~key_valid and the causal "
    "attn_mask = ~tril (torch's boolean MHA masks mean 'masked out').",
    "sinusoidal_positional_encoding": "computed with torch ops (arange, pow, sin, cos) on the "
    "backend's device in the requested dtype.",
    "layer_norm": "F.layer_norm.",
    "transformer_encoder_layer": "nn.TransformerEncoderLayer (eval, dropout 0, batch_first) via "
    "torch.func.functional_call. The forward (no autograd) takes torch's fused inference fast "
    "path (torch._transformer_encoder_layer_fwd) whenever num_heads is even (the other fast "
    "path conditions, eval mode, batch_first, equal eps, relu/gelu, always hold here; verified "
    "in tests/test_attention.py by spying on the kernel); the vjp, with autograd, takes the "
    "ordinary path, so both are checked. Fix-up: the fast path returns NaN for a query that "
    "sees no key (all its keys masked, e.g. key_valid all False, or causal with a masked "
    "first key), where the spec (and torch's own ordinary path) gives the attention block "
    "zeros; for such inputs the fast path is switched off with "
    "torch.backends.mha.set_fastpath_enabled(False).",
    "transformer_decoder_layer": "nn.TransformerDecoderLayer (eval, dropout 0, batch_first) "
    "via torch.func.functional_call; tgt_mask = causal (~tril), memory_key_padding_mask = "
    "~memory_valid. torch has no fast path for the decoder layer.",
}


# -- single-query attention (composed) -------------------------------------------------

def _masked_weights(e: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax over the keys a mask lets through; zeros for a row it lets nothing through
    (its scores are left unmasked so that no NaN reaches autograd, then multiplied by 0)."""
    if mask is None:
        return torch.softmax(e, dim=-1)
    keep = mask | ~mask.any(dim=-1, keepdim=True)
    return torch.softmax(e.masked_fill(~keep, float("-inf")), dim=-1) * mask


def _context(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.bmm(w.unsqueeze(1), values).squeeze(1)


def additive_attention(query, keys, values, W_q, W_k, v, mask=None):
    e = torch.tanh(F.linear(query, W_q).unsqueeze(1) + F.linear(keys, W_k)) @ v
    w = _masked_weights(e, mask)
    return _context(w, values), w


def dot_product_attention(query, keys, values, mask=None):
    e = torch.bmm(keys, query.unsqueeze(2)).squeeze(2)
    w = _masked_weights(e, mask)
    return _context(w, values), w


# -- SDPA and multi-head attention -------------------------------------------------------

def _tril(n_q: int, n_k: int) -> torch.Tensor:
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device()).tril()


def scaled_dot_product_attention(q, k, v, mask=None, is_causal=False, scale=None):
    if mask is not None:  # torch rejects a 1-d [S] mask: give it the leading unit axes
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if is_causal and (mask is not None or (scale is not None and scale < 0)):
        causal = _tril(q.shape[-2], k.shape[-2])
        mask, is_causal = causal if mask is None else mask & causal, False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          scale=scale)


def multi_head_attention(query, key, value, W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o,
                         num_heads, key_valid=None, is_causal=False):
    d = query.shape[-1]
    out, _ = F.multi_head_attention_forward(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), d, num_heads,
        in_proj_weight=None, in_proj_bias=torch.cat([b_q, b_k, b_v]), bias_k=None, bias_v=None,
        add_zero_attn=False, dropout_p=0.0, out_proj_weight=W_o, out_proj_bias=b_o,
        training=False, key_padding_mask=None if key_valid is None else ~key_valid,
        need_weights=False,
        attn_mask=~_tril(query.shape[1], key.shape[1]) if is_causal else None,
        use_separate_proj_weight=True, q_proj_weight=W_q, k_proj_weight=W_k, v_proj_weight=W_v,
        is_causal=is_causal)
    return out.transpose(0, 1)


# -- positional encoding and layer norm --------------------------------------------------

def sinusoidal_positional_encoding(length, d_model, base=10000.0, dtype="float64"):
    dt, dev = torch_dtype(dtype), device()
    pos = torch.arange(length, dtype=dt, device=dev).unsqueeze(1)
    inv_freq = torch.pow(torch.tensor(base, dtype=dt, device=dev),
                         -torch.arange(0, d_model, 2, dtype=dt, device=dev) / d_model)
    angle = pos * inv_freq
    return torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).reshape(length, d_model)


def layer_norm(x, gamma, beta, eps=1e-5):
    return F.layer_norm(x, gamma.shape, gamma, beta, eps)


# -- Transformer layers --------------------------------------------------------------------

@lru_cache(maxsize=64)
def _layer(kind: str, d: int, h: int, f: int, norm_first: bool, activation: str, eps: float,
           dtype: torch.dtype, dev: str) -> nn.Module:
    """An eval-mode layer whose own parameters are placeholders (replaced on every call)."""
    cls = nn.TransformerEncoderLayer if kind == "encoder" else nn.TransformerDecoderLayer
    return cls(d, h, dim_feedforward=f, dropout=0.0, activation=activation,
               layer_norm_eps=eps, batch_first=True, norm_first=norm_first,
               device=dev, dtype=dtype).eval()


def _attention_params(prefix: str, p) -> dict[str, torch.Tensor]:
    W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o = p
    return {f"{prefix}.in_proj_weight": torch.cat([W_q, W_k, W_v]),
            f"{prefix}.in_proj_bias": torch.cat([b_q, b_k, b_v]),
            f"{prefix}.out_proj.weight": W_o, f"{prefix}.out_proj.bias": b_o}


def _ffn_and_norm_params(ffn, norms) -> dict[str, torch.Tensor]:
    W_1, b_1, W_2, b_2 = ffn
    out = {"linear1.weight": W_1, "linear1.bias": b_1, "linear2.weight": W_2,
           "linear2.bias": b_2}
    for i, (gamma, beta) in enumerate(norms, start=1):
        out |= {f"norm{i}.weight": gamma, f"norm{i}.bias": beta}
    return out


def _pairs(ws) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(ws[i], ws[i + 1]) for i in range(0, len(ws), 2)]


@contextmanager
def _fastpath_off():
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _some_query_sees_no_key(key_valid, is_causal: bool) -> bool:
    if key_valid is None:
        return False
    if is_causal:  # query i sees key j <= i: a masked prefix leaves its queries nothing
        return bool((~key_valid[:, 0]).any())
    return bool((~key_valid.any(dim=1)).any())


def transformer_encoder_layer(x, weights, num_heads, key_valid=None, is_causal=False,
                              norm_first=False, activation="relu", eps=1e-5):
    d, t = x.shape[2], x.shape[1]
    layer = _layer("encoder", d, num_heads, weights[8].shape[0], norm_first, activation,
                   eps, x.dtype, str(x.device))
    params = _attention_params("self_attn", weights[:8]) | _ffn_and_norm_params(
        weights[8:12], _pairs(weights[12:16]))
    kwargs = {"src_key_padding_mask": None if key_valid is None else ~key_valid}
    if is_causal:
        kwargs |= {"src_mask": ~_tril(t, t), "is_causal": True}
    guard = _fastpath_off() if _some_query_sees_no_key(key_valid, is_causal) else nullcontext()
    with guard:
        return functional_call(layer, params, (x,), kwargs)


def transformer_decoder_layer(x, memory, weights, num_heads, memory_valid=None,
                              norm_first=False, activation="relu", eps=1e-5):
    d, t = x.shape[2], x.shape[1]
    layer = _layer("decoder", d, num_heads, weights[16].shape[0], norm_first, activation,
                   eps, x.dtype, str(x.device))
    params = (_attention_params("self_attn", weights[:8])
              | _attention_params("multihead_attn", weights[8:16])
              | _ffn_and_norm_params(weights[16:20], _pairs(weights[20:26])))
    kwargs = {"tgt_mask": ~_tril(t, t), "tgt_is_causal": True,
              "memory_key_padding_mask": None if memory_valid is None else ~memory_valid}
    return functional_call(layer, params, (x, memory), kwargs)
