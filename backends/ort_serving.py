"""Serving family on ONNX Runtime's ``com.microsoft`` ``GroupQueryAttention`` contrib kernel.

ONNX Runtime keeps a contiguous key/value cache per sequence (``past_key``/``past_value``,
BNSH), appends the new tokens' keys and values and attends with the queries at the last
positions (``seqlens_k = S − 1``, ``total_sequence_length = S``): exactly the contract's
bottom-right alignment. It has no paged cache, so each sequence's pages are gathered into
that contiguous layout (the first ``S_b − L_b`` keys as the past, the last ``L_b`` as the
new ``key``/``value``), one session run per sequence. The options map to the operator's
own inputs and attributes: ``causal``, ``local_window_size`` (``left + 1``: measured, a
query sees its own position and the ``w − 1`` before it, Mistral's ``w``), ``softcap`` and
``scale`` (float32 attributes), ``head_sink`` (attention sinks),
and ``attention_bias`` carrying the ALiBi bias ``−slope·|pos − j|`` (an additive score
bias, as the operator defines it). What the operator does not express is unsupported:
``return_lse`` (no LSE output), float64 (not in its type constraints), a window without
``causal``, more queries than keys, and a sequence with queries but no key. The kernel
wants one head size for queries, keys and values, a multiple of 8: all three are
zero-padded to it (the scores and weights are unchanged; the padded output channels are
cut) and the default ``scale = 1/√E`` of the unpadded ``E`` is passed explicitly.
``merge_attention_states`` has no ONNX Runtime kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmspec.backends.onnxruntime_backend import Runtime

NOTES = {
    "paged_attention": "com.microsoft GroupQueryAttention, one run per sequence: pages gathered "
    "into a contiguous BNSH past_key/past_value (the first S − L keys) plus the last L keys as "
    "key/value, seqlens_k = S − 1, total_sequence_length = S; causal, local_window_size "
    "(= left + 1: a query sees its position and the w − 1 before it, measured), softcap, "
    "scale, head_sink (sinks), attention_bias (ALiBi as −slope·|pos − "
    "j|); q, k, v zero-padded to one head size, a multiple of 8 (the kernel's requirement), "
    "scale = 1/√E passed explicitly. Unsupported: return_lse, float64, windows without "
    "causal, L > S, queries with no key.",
}

_INT32 = 6  # ONNX TensorProto.INT32


def _gather(cache: np.ndarray, row: np.ndarray, n_k: int) -> np.ndarray:
    """``[g, n_k, ·]``: the first ``n_k`` slots of the pages ``row[0], row[1], …``."""
    page = cache.shape[1]
    pages = cache[np.asarray(row[: -(-n_k // page)], dtype=np.int64)]
    return pages.reshape(-1, *cache.shape[2:])[:n_k].transpose(1, 0, 2)


def _window(is_causal: bool, window: Any) -> int:
    if window is None:
        return -1
    left, right = window
    if not is_causal:
        raise NotImplementedError("GroupQueryAttention's window (local_window_size) is causal "
                                  "only")
    # measured: local_window_size = w lets a query see its own position and the w − 1
    # before it (Mistral's w), i.e. the contract's (w − 1, 0); the right side is moot
    # under causal
    return -1 if left is None else int(left) + 1


def _sequence(rt: Runtime, q, k, v, n_q: int, attrs: dict[str, Any], bias, sinks):
    h, e = q.shape[1], q.shape[2]
    g, n_k = k.shape[0], k.shape[1]
    past = n_k - n_q
    feeds = [("q", q.reshape(1, n_q, h * e)),
             ("k", np.ascontiguousarray(k[:, past:].transpose(1, 0, 2)).reshape(1, n_q, g * e)),
             ("v", np.ascontiguousarray(v[:, past:].transpose(1, 0, 2)).reshape(1, n_q, g * e)),
             ("pk", np.ascontiguousarray(k[None, :, :past])),
             ("pv", np.ascontiguousarray(v[None, :, :past])),
             ("seqlens", np.array([n_k - 1], dtype=np.int64)),
             ("total", np.array(n_k, dtype=np.int64))]
    if bias is not None:
        feeds.append(("bias", bias))
    if sinks is not None:
        feeds.append(("sinks", sinks))

    def build(b: Any, _: list[str]) -> str:
        seqlens = b.op("Cast", "seqlens", to=_INT32)
        total = b.op("Cast", "total", to=_INT32)
        ins = ["q", "k", "v", "pk", "pv", seqlens, total, "", "", "",
               "bias" if bias is not None else "", "sinks" if sinks is not None else ""]
        return b.op("GroupQueryAttention", *ins, domain="com.microsoft", outputs=3,
                    num_heads=h, kv_num_heads=g, **attrs)[0]

    key = ("GroupQueryAttention", h, g, tuple(sorted(attrs.items())), bias is None,
           sinks is None)
    return rt.run(key, feeds, build)[0].reshape(n_q, h, -1)


def paged_attention(rt: Runtime, q, k_cache, v_cache, block_table, kv_lens, q_indptr,
                    scale=None, is_causal=True, window=None, alibi_slopes=None, softcap=None,
                    sinks=None, return_lse=False):
    if return_lse:
        raise NotImplementedError("GroupQueryAttention has no log-sum-exp output")
    if q.dtype == np.float64:
        raise NotImplementedError("GroupQueryAttention takes float16, bfloat16 and float32")
    e, ev = q.shape[-1], v_cache.shape[-1]
    # the kernel wants one head size, a multiple of 8: queries, keys and values are
    # zero-padded to it (q·k and the weights unchanged; the padded output channels are cut),
    # so the default scale 1/√E is passed explicitly
    width = -(-max(e, ev) // 8) * 8
    q, k_cache, v_cache = (np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])])
                           for a in (q, k_cache, v_cache))
    attrs = {"causal": int(bool(is_causal)), "local_window_size": _window(is_causal, window),
             "scale": float(1 / np.sqrt(e) if scale is None else scale)}
    if softcap is not None:
        attrs["softcap"] = float(softcap)
    n, h, _ = q.shape
    out = np.zeros((n, h, width), dtype=q.dtype)
    for b, n_k in enumerate(np.asarray(kv_lens).tolist()):
        lo, hi = int(q_indptr[b]), int(q_indptr[b + 1])
        if hi == lo:
            continue
        if hi - lo > n_k:
            raise NotImplementedError("GroupQueryAttention puts the queries at the last "
                                      "positions of the cache: more queries than keys, or "
                                      "queries with no key, are not expressed")
        bias = None
        if alibi_slopes is not None:
            sl = np.asarray(alibi_slopes if alibi_slopes.ndim == 1 else alibi_slopes[b])
            pos = n_k - (hi - lo) + np.arange(hi - lo)
            dist = np.abs(pos[:, None] - np.arange(n_k)[None, :]).astype(q.dtype)
            bias = (-(sl.astype(q.dtype)[:, None, None]) * dist[None])[None]
        out[lo:hi] = _sequence(rt, q[lo:hi], _gather(k_cache, block_table[b], n_k),
                               _gather(v_cache, block_table[b], n_k), hi - lo, attrs, bias,
                               sinks)
    return out[..., :ev]
