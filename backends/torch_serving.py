"""Serving family on torch's own attention kernels.

torch has no paged-attention kernel for the CPU. Its paged path,
``torch.nn.attention.experimental._paged_attention.PagedAttention``, rewrites a
``flex_attention`` block mask and ``score_mod`` from logical to physical pages. On the CPU in
torch 2.13 ``flex_attention`` has no backward ("FlexAttention does not support backward on
CPU"); under ``torch.compile`` it costs ~15 s of compilation per new shape and ``score_mod``
(measured: 15.3 s for one [1,4,5,8] call); and even called eagerly it traces ``score_mod``
and ``mask_mod`` with dynamo, recompiling for every new combination of options and shapes
(0.1–1.5 s each; 161 s of 189 s of a 16-check run went to dynamo, measured with cProfile),
with 16 ms per call once warm against 1.6 ms for SDPA. A conformance run of hundreds of
shapes cannot pay that, so flex_attention is not used. Instead each sequence's pages are
gathered as torch users do on the CPU (``index_select`` of its ``block_table`` entries up to
``⌈kv_lens/page⌉``, reshaped and cut to ``kv_lens``; autograd scatters the gradient back,
adding where pages are shared), and the attention is one of torch's SDPA kernels per
sequence (a varlen batch is a loop):

- ``F.scaled_dot_product_attention(enable_gqa=True)`` with an additive float mask: ``−inf``
  where a key is not visible (bottom-right causal, window), ``−slope·|pos − j|`` elsewhere;
- with ``return_lse``, the CPU flash kernel behind SDPA,
  ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` (what torch's own
  context-parallel attention calls to merge partial results by their LSE), with the same
  mask, the key/value heads repeated to ``h`` and the values zero-padded to ``E`` (it wants
  one head size). It dies with SIGFPE on an empty key set, so a sequence with queries and no
  key is unsupported there; its LSE output does not require grad, so the vjp with
  ``return_lse`` is unsupported.

``softcap`` (only flex_attention has it) and ``sinks`` (no torch kernel has them) are
unsupported. ``merge_attention_states`` is not implemented: torch has no kernel for it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmspec import Deviation

from .torch_attention import half_intermediates
from .torch_modern import _visible

NOTES = {
    "paged_attention": "Pages gathered per sequence with index_select of the needed "
    "block_table entries (cut to kv_lens); then F.scaled_dot_product_attention(enable_gqa="
    "True) with an additive float mask (−inf: not visible; −slope·|pos − j|: ALiBi); with "
    "return_lse, aten._scaled_dot_product_flash_attention_for_cpu (same mask, key/value heads "
    "repeated, values zero-padded to E; an empty key set crashes it with SIGFPE, and its LSE "
    "has no gradient: both unsupported). softcap (only flex_attention has it, and on the CPU "
    "it has no backward and recompiles with dynamo per configuration) and sinks (no torch "
    "kernel) unsupported.",
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


_CPU_DEVIATIONS = {
    "paged_attention/forward": Deviation(
        "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu (torch 2.13, the CPU flash "
        "kernel behind SDPA) returns logsumexp 0, not −inf, for a query whose mask row is all "
        "−inf (its output is correctly 0): q[3,2,2] against one key, is_causal=False, window "
        "(0, 0) gives lse rows [0, 0] where the spec gives −inf (measured; flex_attention gives "
        "−inf). Merged as a cascade part, such an LSE gives a zero output the weight of a real "
        "one.", applies=_lse_of_query_without_keys),
} | half_intermediates(
    "paged_attention/vjp/{dtype}",
    "F.scaled_dot_product_attention's CPU backward for half tensors holds the probabilities "
    "and the gradients of the scores in the input dtype (as for grouped_query_attention), "
    "and index_select's backward adds the gradients of shared pages in it (worst over "
    "seeds 0-4).",
    {"float16": 11.2, "bfloat16": 42.8})


def DEVIATIONS(device: str) -> dict[str, Deviation]:  # noqa: N802 - the backend's hook
    """Known differences of torch's kernels from the spec on ``device`` (measured)."""
    return dict(_CPU_DEVIATIONS) if device == "cpu" else {}


def _gather(cache: torch.Tensor, row: torch.Tensor, n_k: int) -> torch.Tensor:
    """``[1, g, n_k, ·]``: the first ``n_k`` slots of the pages ``row[0], row[1], …``."""
    page = cache.shape[1]
    n = -(-n_k // page)
    pages = cache.index_select(0, row[:n])
    return pages.reshape(n * page, *cache.shape[2:])[:n_k].permute(1, 0, 2).unsqueeze(0)


def _sdpa(q, k, v, allow, rel, scale, slopes, lse: bool):
    h, e, ev = q.shape[1], q.shape[-1], v.shape[-1]
    bias = torch.zeros((), dtype=q.dtype, device=q.device)
    if slopes is not None:
        bias = -slopes.reshape(1, h, 1, 1) * rel.abs().to(q.dtype)
    attn = torch.where(allow, bias, torch.full((), -math.inf, dtype=q.dtype, device=q.device))
    if not lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn, scale=scale,
                                              enable_gqa=True), None
    if q.device.type != "cpu":
        raise NotImplementedError("the LSE is taken from the CPU flash kernel; no LSE path is "
                                  "wired for other devices")
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


def paged_attention(q, k_cache, v_cache, block_table, kv_lens, q_indptr, scale=None,
                    is_causal=True, window=None, alibi_slopes=None, softcap=None, sinks=None,
                    return_lse=False):
    if sinks is not None:
        raise NotImplementedError("torch 2.13 has no attention kernel with sinks")
    if softcap is not None:
        raise NotImplementedError("softcap: torch's only kernel with a score_mod, flex_attention, "
                                  "has no CPU backward and traces score_mod with dynamo at every "
                                  "new configuration even in eager mode (0.1-1.5 s a call)")
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
        allow, rel = _visible(n_q, n_k, is_causal, n_k - n_q, window, q.device)
        o, lse = _sdpa(qb, kb, vb, allow, rel, scale, slopes, bool(return_lse))
        outs.append(o[0].permute(1, 0, 2))
        lses.append(None if lse is None else lse[0].permute(1, 0))
    ev = v_cache.shape[-1]
    out = torch.cat(outs) if outs else v_cache.new_zeros((0, h, ev))
    if not return_lse:
        return out
    return out, torch.cat(lses) if lses else q.new_zeros((0, h), dtype=torch.float32)
