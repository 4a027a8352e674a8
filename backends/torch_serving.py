"""Serving family on torch's own attention kernels.

torch has no paged-attention kernel for the CPU. Its paged path,
``torch.nn.attention.experimental._paged_attention.PagedAttention``, rewrites a
``flex_attention`` block mask and ``score_mod`` from logical to physical pages; on the CPU
``flex_attention`` has no backward in torch 2.13 ("FlexAttention does not support backward
on CPU"), runs eagerly as an unfused implementation that materialises the score matrix
(17 ms per call here, against 1.6 ms for the SDPA kernels), and under ``torch.compile`` costs
~15 s of compilation per new shape and ``score_mod`` (measured: 15.3 s for one [1,4,5,8]
call), which a conformance run of hundreds of shapes cannot pay. So each sequence's pages
are gathered as torch users do on the CPU (``index_select`` of its ``block_table`` entries
up to ``⌈kv_lens/page⌉``, reshaped and cut to ``kv_lens``; autograd scatters the gradient
back, adding where pages are shared), and the attention is one of torch's kernels per
sequence (a varlen batch is a loop):

- ``F.scaled_dot_product_attention(enable_gqa=True)`` with an additive float mask: ``−inf``
  where a key is not visible (bottom-right causal, window), ``−slope·|pos − j|`` elsewhere;
- with ``return_lse``, the CPU flash kernel behind SDPA,
  ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` (what torch's own
  context-parallel attention calls to merge partial results by their LSE), with the same
  mask, the key/value heads repeated to ``h`` and the values zero-padded to ``E`` (it wants
  one head size); it dies with SIGFPE on an empty key set, so a sequence with queries and
  no key is unsupported there;
- with ``softcap`` (no SDPA form), eager ``flex_attention`` with the cap and the ALiBi bias
  in ``score_mod``, the visibility in a ``create_block_mask`` mask and
  ``AuxRequest(lse=True)``; torch refuses its gradient on the CPU, and it refuses a sequence
  with queries but no key (IndexError): both unsupported.

``sinks`` are unsupported: no torch attention kernel has them in torch 2.13.
``merge_attention_states`` is not implemented: torch has no kernel for it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmspec import Deviation

from .torch_modern import _visible

NOTES = {
    "paged_attention": "Pages gathered per sequence with index_select of the needed "
    "block_table entries (cut to kv_lens); then F.scaled_dot_product_attention(enable_gqa="
    "True) with an additive float mask (−inf: not visible; −slope·|pos − j|: ALiBi); with "
    "return_lse, aten._scaled_dot_product_flash_attention_for_cpu (same mask, key/value heads "
    "repeated, values zero-padded to E; an empty key set crashes it with SIGFPE: unsupported); "
    "with softcap, eager flex_attention (score_mod: cap and ALiBi; create_block_mask: "
    "bottom-right causal and window; AuxRequest(lse=True)), whose backward torch 2.13 refuses "
    "on the CPU, and which refuses a sequence with queries but no key: both unsupported. "
    "sinks unsupported (no torch kernel has them).",
}


_ARGS = ("q", "k_cache", "v_cache", "block_table", "kv_lens", "q_indptr", "scale",
         "is_causal", "window", "alibi_slopes", "softcap", "sinks", "return_lse")


def _bound(args, kwargs) -> dict[str, Any]:
    return {**dict(zip(_ARGS, args)), **kwargs}


def _lse_of_query_without_keys(args, kwargs) -> bool:
    """The flash path (``return_lse``, no softcap, no sinks) on a batch where some query
    sees no key."""
    from lmspec.modern import visibility

    a = _bound(args, kwargs)
    if not a.get("return_lse") or a.get("softcap") is not None or a.get("sinks") is not None:
        return False
    ind, lens = np.asarray(a["q_indptr"]), np.asarray(a["kv_lens"])
    for b, n_k in enumerate(lens.tolist()):
        n_q = int(ind[b + 1] - ind[b])
        if n_q:
            allow, _ = visibility(n_q, n_k, n_k - n_q, bool(a.get("is_causal", True)),
                                  a.get("window"))
            if (~allow.any(axis=1)).any():
                return True
    return False


DEVIATIONS = {
    "paged_attention/forward": Deviation(
        "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu (torch 2.13, the CPU flash "
        "kernel behind SDPA) returns logsumexp 0, not −inf, for a query whose mask row is all "
        "−inf (its output is correctly 0): q[3,2,2] against one key, is_causal=False, window "
        "(0, 0) gives lse rows [0, 0] where the spec gives −inf (measured; flex_attention gives "
        "−inf). Merged as a cascade part, such an LSE gives a zero output the weight of a real "
        "one.", applies=_lse_of_query_without_keys),
}


def _gather(cache: torch.Tensor, row: torch.Tensor, n_k: int) -> torch.Tensor:
    """``[1, g, n_k, ·]``: the first ``n_k`` slots of the pages ``row[0], row[1], …``."""
    page = cache.shape[1]
    n = -(-n_k // page)
    pages = cache.index_select(0, row[:n])
    return pages.reshape(n * page, *cache.shape[2:])[:n_k].permute(1, 0, 2).unsqueeze(0)


def _sdpa(q, k, v, allow, rel, scale, slopes, lse: bool):
    h, e, ev = q.shape[1], q.shape[-1], v.shape[-1]
    bias = torch.zeros((), dtype=q.dtype)
    if slopes is not None:
        bias = -slopes.reshape(1, h, 1, 1) * rel.abs().to(q.dtype)
    attn = torch.where(allow, bias, torch.full((), -math.inf, dtype=q.dtype))
    if not lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn, scale=scale,
                                              enable_gqa=True), None
    if k.shape[2] == 0:
        raise NotImplementedError("aten._scaled_dot_product_flash_attention_for_cpu dies with "
                                  "SIGFPE on an empty key set (torch 2.13)")
    if ev > e:
        raise NotImplementedError("aten._scaled_dot_product_flash_attention_for_cpu needs one "
                                  "head size; values wider than queries are not expressed")
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    v = F.pad(v, (0, e - ev))
    out, lse_ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=attn.expand(1, h, *attn.shape[-2:]), scale=scale)
    return out[..., :ev], lse_


def _flex(q, k, v, n_q, n_k, causal, window, scale, slopes, softcap):
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    if n_k == 0:
        raise NotImplementedError("flex_attention refuses a sequence with queries and no key "
                                  "(IndexError: max() over an empty key axis)")
    off = n_k - n_q

    def score_mod(score, b, h, qi, kv):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            score = score - slopes[h] * (off + qi - kv).abs().to(score.dtype)
        return score

    def mask_mod(b, h, qi, kv):
        rel = kv - (off + qi)
        ok = rel == rel
        if causal:
            ok = ok & (rel <= 0)
        if window is not None:
            if window[0] is not None:
                ok = ok & (rel >= -window[0])
            if window[1] is not None:
                ok = ok & (rel <= window[1])
        return ok

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile()": eager on purpose
        mask = create_block_mask(mask_mod, 1, None, n_q, n_k, device=str(q.device))
        out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale,
                                  enable_gqa=True, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def paged_attention(q, k_cache, v_cache, block_table, kv_lens, q_indptr, scale=None,
                    is_causal=True, window=None, alibi_slopes=None, softcap=None, sinks=None,
                    return_lse=False):
    if sinks is not None:
        raise NotImplementedError("torch 2.13 has no attention kernel with sinks")
    flex = softcap is not None
    if return_lse and torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k_cache, v_cache)):
        # the kernels' LSE outputs do not require grad: autograd would drop its cotangent
        raise NotImplementedError("torch's attention kernels return a logsumexp that is not "
                                  "differentiable")
    n, h, _ = q.shape
    ind, lens = q_indptr.tolist(), kv_lens.tolist()
    outs: list[torch.Tensor] = []
    lses: list[Any] = []
    for b, n_k in enumerate(lens):
        n_q = ind[b + 1] - ind[b]
        if n_q == 0:
            continue
        qb = q[ind[b]: ind[b + 1]].permute(1, 0, 2).unsqueeze(0)
        kb, vb = _gather(k_cache, block_table[b], n_k), _gather(v_cache, block_table[b], n_k)
        slopes = None if alibi_slopes is None else (
            alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b])
        if flex:
            o, lse = _flex(qb, kb, vb, n_q, n_k, is_causal, window, scale, slopes, softcap)
        else:
            allow, rel = _visible(n_q, n_k, is_causal, n_k - n_q, window, q.device)
            o, lse = _sdpa(qb, kb, vb, allow, rel, scale, slopes, bool(return_lse))
        outs.append(o[0].permute(1, 0, 2))
        lses.append(None if lse is None else lse[0].permute(1, 0))
    ev = v_cache.shape[-1]
    out = torch.cat(outs) if outs else v_cache.new_zeros((0, h, ev))
    if not return_lse:
        return out
    return out, torch.cat(lses) if lses else q.new_zeros((0, h), dtype=torch.float32)
