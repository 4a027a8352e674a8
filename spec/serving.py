"""Serving family: attention over a paged key/value cache (CONTRACT §2, added 2026-12-06).

Serving engines keep each sequence's keys and values in fixed-size pages of one shared cache
(vLLM's PagedAttention, Kwon et al. 2023; FlashInfer, Ye et al. 2025) and pack the queries
of a batch of sequences along one axis. :func:`paged_attention` is defined through
:func:`lmspec.grouped_query_attention`: the result for sequence ``b`` is GQA of its ``L_b``
queries against the ``S_b = kv_lens[b]`` keys its block table names, with the bottom-right
alignment ``q_offset = S_b − L_b``, plus optional attention sinks (one learned logit per
head in every softmax denominator; Xiao et al. 2024, gpt-oss). :func:`merge_attention_states`
combines attention over disjoint key sets from their log-sum-exps (FlashInfer's
``merge_state``; split-KV / cascade attention, Juravsky et al. 2024).

The scores, their cap, bias and pullback are :func:`lmspec.modern.gqa_scores` and the
visibility :func:`lmspec.modern.visibility` (the very code of GQA); the softmax and its
pullback are :func:`lmspec.blocks.attend`. A sink is one more score column per
query row, visible, with a value of 0: the softmax over ``[s, sink]`` is the contract's
``exp(sinks[j])`` in the denominator, computed with the same stabilised softmax, and the
sink's gradient is that column's score gradient.

Readings chosen where the contract is silent: ``alibi_slopes`` is ``[h]`` or ``[B,h]`` (as
for GQA); ``sinks`` must be finite; ``kv_lens[b] ≤ M·page``; a needed ``block_table`` entry
must lie in ``[0, P)`` (entries past ``⌈kv_lens[b]/page⌉`` are never read, so never
checked); a sequence with ``L_b > 0`` and ``S_b = 0`` (only without ``is_causal``) sees no
key. ``merge_attention_states``' ``lses`` may hold ``−inf`` but not NaN or ``+inf``; a part
with ``lse = −inf`` contributes nothing whatever its output holds.
"""

from __future__ import annotations

import numpy as np

from . import _validate as v
from ._catalogue import reference, vjp_rule
from ._precision import fl
from .blocks import attend
from .core import logsumexp
from .modern import _check_window, _finite, gqa_scores, visibility

# -- paged_attention -----------------------------------------------------------------------

OP = "paged_attention"


def _check_layout(q, k_cache, v_cache, block_table, kv_lens, q_indptr):
    qq = v.floats(OP, "q", q, ndim=3)
    n, h, e = qq.shape
    kc = v.floats(OP, "k_cache", k_cache, ndim=4)
    n_p, page, g = kc.shape[:3]
    if kc.shape[3] != e or page < 1 or g < 1 or h % g:
        v.fail(OP, "k_cache", f"shape [P, page >= 1, g, E={e}] with h={h} a multiple of g",
               f"shape {kc.shape}")
    vc = v.floats(OP, "v_cache", v_cache, shape=(n_p, page, g, None))
    bt = v.ints(OP, "block_table", block_table, ndim=2)
    b, m = bt.shape
    lens = v.ints(OP, "kv_lens", kv_lens, shape=(b,), low=0, high=m * page + 1)
    ind = v.ints(OP, "q_indptr", q_indptr, shape=(b + 1,), low=0, high=n + 1)
    if ind[0] != 0 or ind[-1] != n or np.any(np.diff(ind) < 0):
        v.fail(OP, "q_indptr", f"non-decreasing from 0 to N={n}", ind.tolist())
    for i in range(b):
        need = bt[i, : -(-int(lens[i]) // page)]
        bad = (need < 0) | (need >= n_p)
        if bad.any():
            j = int(np.argmax(bad))
            v.fail(OP, "block_table", f"page indices in [0, P={n_p}) for the "
                   f"⌈kv_lens/page⌉ pages each sequence reads",
                   f"{need[j]} at index [{i}, {j}]")
    return qq, kc, vc, bt, lens, ind


def _check_paged(q, k_cache, v_cache, block_table, kv_lens, q_indptr, scale, is_causal,
                 window, alibi_slopes, softcap, sinks, return_lse):
    qq, kc, vc, bt, lens, ind = _check_layout(q, k_cache, v_cache, block_table, kv_lens,
                                              q_indptr)
    b, h = len(lens), qq.shape[1]
    causal = v.flag(OP, "is_causal", is_causal)
    n_q = np.diff(ind)
    if causal and np.any(n_q > lens):
        i = int(np.argmax(n_q > lens))
        v.fail(OP, "q_indptr", "at most kv_lens[b] queries for sequence b when is_causal",
               f"{n_q[i]} queries against {lens[i]} keys for sequence {i}")
    v.budget(OP, "q", int(np.sum(n_q * (lens + 1))) * h, "scores [Σ_b L_b·(S_b + 1), h]")
    s = _finite(OP, "scale", v.default_scale(OP, qq, scale))
    win = _check_window(OP, window)
    slopes = None
    if alibi_slopes is not None:
        slopes = v.floats(OP, "alibi_slopes", alibi_slopes)
        if slopes.shape not in ((h,), (b, h)):
            v.fail(OP, "alibi_slopes", f"shape [h={h}] or [B={b}, h={h}]",
                   f"shape {slopes.shape}")
        slopes = np.broadcast_to(slopes, (b, h))
    cap = None if softcap is None else _finite(OP, "softcap", softcap, low=0.0, low_open=True)
    sk = None
    if sinks is not None:
        sk = v.floats(OP, "sinks", sinks, shape=(h,))
        if not np.all(np.isfinite(sk)):
            v.fail(OP, "sinks", "finite values", sk.tolist())
    v.flag(OP, "return_lse", return_lse)
    return qq, kc, vc, bt, lens, ind, s, causal, win, slopes, cap, sk


def slots(block_table_row: np.ndarray, n_k: int, page: int) -> np.ndarray:
    """The flat cache slots ``page_index·page + offset`` of a sequence's first ``n_k`` keys:
    its pages ``block_table_row[0], [1], …`` taken in order."""
    pages = block_table_row[: -(-n_k // page)]
    return (pages[:, None] * page + np.arange(page)).reshape(-1)[:n_k]


def _sequence_fwd(q, k, v_, n_k, scale, causal, win, slopes, cap, sink):
    """One sequence: ``q[L, h, E]`` against ``k[S, g, E]``, ``v[S, g, Ev]``, ``q_offset =
    S − L``. Scores and visibility are GQA's; the sink is one more visible score column
    (value 0) appended after the cap and bias. Returns ``(out[L, h, Ev], lse[L, h])`` and
    the pullback ``(∂out, ∂lse) -> (∂q, ∂k, ∂v, ∂sinks)``, with ``∂lse_i = P_i`` (the softmax
    row, sink included) added to the score gradient."""
    n_q, h, e = q.shape
    g = k.shape[1]
    rep = h // g
    qb = np.transpose(q, (1, 0, 2))[None]  # [1, h, L, E]
    kb = np.transpose(k, (1, 0, 2))[None]  # [1, g, S, E]
    vb = np.transpose(v_, (1, 0, 2))[None]
    allow, rel = visibility(n_q, n_k, n_k - n_q, causal, win)
    s, score_back = gqa_scores(qb, kb, scale, rel, slopes, cap)  # [1, g, rep·L, S]
    sink_col = np.zeros((1, g, rep * n_q, 1), dtype=s.dtype)
    if sink is not None:
        sink_col += np.repeat(sink.reshape(g, rep), n_q, axis=1)[None, :, :, None]
    s_ext = np.concatenate([s, sink_col], axis=-1)
    allow_ext = np.concatenate([np.broadcast_to(allow, (rep, n_q, n_k)).reshape(rep * n_q, n_k),
                                np.full((rep * n_q, 1), sink is not None)], axis=-1)
    allow_ext = np.broadcast_to(allow_ext, s_ext.shape)
    lse = logsumexp(np.where(allow_ext, s_ext, -np.inf), -1)  # [1, g, rep·L]
    v_ext = np.concatenate([vb, np.zeros((1, g, 1, vb.shape[-1]), dtype=vb.dtype)], axis=2)
    (out, p), attend_back = attend(s_ext, allow_ext, v_ext)

    def per_query(x):  # [1, g, rep·L, ·] -> [L, h, ·]
        return np.transpose(x.reshape(h, n_q, -1), (1, 0, 2))

    def grouped(x):  # [L, h, ·] -> [1, g, rep·L, ·]
        return np.ascontiguousarray(np.transpose(x, (1, 0, 2))).reshape(1, g, rep * n_q, -1)

    def back(d_out, d_lse):
        ds, dv = attend_back(grouped(d_out))
        if d_lse is not None:
            ds += p * grouped(d_lse[..., None])
        dq, dk = score_back(ds[..., :n_k])
        d_sink = ds[..., n_k].reshape(h, n_q).sum(axis=1)
        return (np.transpose(dq[0], (1, 0, 2)), np.transpose(dk[0], (1, 0, 2)),
                np.transpose(dv[0, :, :n_k], (1, 0, 2)), d_sink)

    return per_query(out), per_query(lse[..., None])[..., 0], back


def _paged_fwd(q, kc, vc, bt, lens, ind, scale, causal, win, slopes, cap, sk):
    """Every sequence through :func:`_sequence_fwd` on the slots its block table names.
    Pullback: each sequence's ``∂k``, ``∂v`` are added into the slots it read
    (``np.add.at``: slots read by several sequences accumulate; the others stay 0)."""
    n, h, _ = q.shape
    page, g = kc.shape[1], kc.shape[2]
    kf, vf = kc.reshape(-1, g, kc.shape[3]), vc.reshape(-1, g, vc.shape[3])
    out = np.zeros((n, h, vc.shape[3]), dtype=q.dtype)
    lse = np.full((n, h), -np.inf, dtype=q.dtype)
    backs = []
    for b in range(len(lens)):
        lo, hi, n_k = int(ind[b]), int(ind[b + 1]), int(lens[b])
        if hi == lo:
            continue
        idx = slots(bt[b], n_k, page)
        o, l_, back = _sequence_fwd(q[lo:hi], kf[idx], vf[idx], n_k, scale, causal, win,
                                    None if slopes is None else slopes[b], cap, sk)
        out[lo:hi], lse[lo:hi] = o, l_
        backs.append((lo, hi, idx, back))

    def pullback(d_out, d_lse):
        dq, dkf, dvf = np.zeros_like(q), np.zeros_like(kf), np.zeros_like(vf)
        dsk = None if sk is None else np.zeros_like(sk)
        for lo, hi, idx, back in backs:
            gq, gk, gv, gs = back(d_out[lo:hi], None if d_lse is None else d_lse[lo:hi])
            dq[lo:hi] = gq
            np.add.at(dkf, idx, gk)
            np.add.at(dvf, idx, gv)
            if dsk is not None:
                dsk += gs
        return {"q": dq, "k_cache": dkf.reshape(kc.shape), "v_cache": dvf.reshape(vc.shape),
                "sinks": dsk}

    return out, lse, pullback


@reference("serving", diff=("q", "k_cache", "v_cache", "sinks"))
def paged_attention(q, k_cache, v_cache, block_table, kv_lens, q_indptr, scale=None,
                    is_causal=True, window=None, alibi_slopes=None, softcap=None, sinks=None,
                    return_lse=False):
    """Attention of packed queries ``q[N,h,E]`` over a paged cache ``k_cache[P,page,g,E]``,
    ``v_cache[P,page,g,Ev]`` (vLLM's PagedAttention, Kwon et al. 2023; FlashInfer).

    Sequence ``b`` owns query rows ``q_indptr[b] : q_indptr[b+1]`` (``L_b`` of them, maybe 0)
    and the keys/values in the first ``S_b = kv_lens[b]`` slots of pages ``block_table[b,0],
    block_table[b,1], …`` in order. Its result is ``grouped_query_attention(q_b, K_b, V_b,
    is_causal, scale, q_offset = S_b − L_b, window, alibi_slopes[b], softcap)``:
    ``s = softcap·tanh(scale·q·k/softcap) − slope·|S_b − L_b + i − j|``, softmax over the
    visible keys (``j ≤ S_b − L_b + i`` when causal; ``−left ≤ j − (S_b − L_b + i) ≤ right``)
    with ``exp(sinks[j])`` added to the denominator of head ``j`` (Xiao et al. 2024). With
    ``return_lse`` also ``lse[N,h] = ln(Σ_visible exp(s) + exp(sink))`` (``−inf`` for a
    query with no visible key and no sink; its output is zeros). Slots and block-table
    entries that no sequence reads may hold anything.
    """
    args = _check_paged(q, k_cache, v_cache, block_table, kv_lens, q_indptr, scale, is_causal,
                        window, alibi_slopes, softcap, sinks, return_lse)
    with np.errstate(over="ignore"):
        out, lse, _ = _paged_fwd(*args)
    return (out, lse) if return_lse else out


@vjp_rule(paged_attention)
def _paged_attention_vjp(cot, q, k_cache, v_cache, block_table, kv_lens, q_indptr, scale=None,
                         is_causal=True, window=None, alibi_slopes=None, softcap=None,
                         sinks=None, return_lse=False):
    """Per sequence, GQA's pullback on the gathered keys with the sink column:
    ``∂s = P ⊙ (∂O Vᵀ − rowsum) + P·∂lse``, ``∂sinks[j] = Σ_rows ∂s_sink``; then
    ``∂q = scale·∂s K``, ``∂K = scale·∂sᵀ q`` (``1 − tanh²`` under a cap), ``∂V = Pᵀ ∂O``,
    and ``∂K``, ``∂V`` are added into the cache slots that were read (shared pages
    accumulate, unread slots get 0)."""
    args = _check_paged(q, k_cache, v_cache, block_table, kv_lens, q_indptr, scale, is_causal,
                        window, alibi_slopes, softcap, sinks, return_lse)
    with np.errstate(over="ignore"):
        _, _, back = _paged_fwd(*args)
        d_out, d_lse = cot if return_lse else (cot, None)
        return back(fl(d_out), None if d_lse is None else fl(d_lse))


# -- merge_attention_states ----------------------------------------------------------------


def _check_merge(outputs, lses):
    op = "merge_attention_states"
    o = v.floats(op, "outputs", outputs, ndim=4)
    s_, n, h, _ = o.shape
    if s_ < 1:
        v.fail(op, "outputs", "at least one part (S >= 1)", f"shape {o.shape}")
    ls = v.floats(op, "lses", lses, shape=(s_, n, h))
    if np.any(np.isnan(ls)) or np.any(ls == np.inf):
        v.fail(op, "lses", "finite values or -inf", "NaN or +inf")
    return o, ls


def _merge_fwd(o, ls):
    """``lse = logsumexp_s lses[s]``, ``w_s = exp(lses[s] − lse)`` (0 for a part with
    ``−inf``, and everywhere when every part is ``−inf``), ``out = Σ_s w_s·outputs[s]``.
    Pullback: ``∂outputs[s] = w_s ∂out``, ``∂lses[s] = w_s·(∂lse + ⟨∂out, outputs[s] − out⟩)``."""
    lse = logsumexp(ls, 0)
    live = ls > -np.inf
    w = np.where(live, np.exp(np.where(live, ls, 0) - np.where(np.isfinite(lse), lse, 0)), 0)
    contrib = np.where(live[..., None], w[..., None] * np.where(live[..., None], o, 0), 0)
    out = np.sum(contrib, axis=0)

    def back(d_out, d_lse):
        d_o = w[..., None] * d_out
        diff = np.where(live[..., None], o, 0) - out
        d_ls = w * (d_lse + np.sum(d_out * diff, axis=-1))
        return {"outputs": d_o, "lses": d_ls}

    return out, lse, back


@reference("serving", diff=("outputs", "lses"))
def merge_attention_states(outputs, lses):
    """Attention over the union of ``S`` disjoint key sets from the attention over each
    (FlashInfer's ``merge_state``; split-KV and cascade attention, Juravsky et al. 2024):
    ``lse = logsumexp_s lses[s]``, ``out = Σ_s exp(lses[s] − lse)·outputs[s]``.

    A part with ``lse = −inf`` (no key) contributes nothing; if every part is ``−inf`` the
    result is zeros and ``−inf``. Returns ``(out[N,h,Ev], lse[N,h])``.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        out, lse, _ = _merge_fwd(*_check_merge(outputs, lses))
    return out, lse


@vjp_rule(merge_attention_states)
def _merge_attention_states_vjp(cot, outputs, lses):
    """``∂outputs[s] = w_s·∂out``, ``∂lses[s] = w_s·(∂lse + Σ_e ∂out·(outputs[s] − out))``
    with ``w_s = exp(lses[s] − lse)`` (0 for ``−inf`` parts; all 0 when every part is)."""
    with np.errstate(invalid="ignore", over="ignore"):
        _, _, back = _merge_fwd(*_check_merge(outputs, lses))
        d_out, d_lse = cot
        return back(fl(d_out), fl(d_lse))


__all__ = ["merge_attention_states", "paged_attention", "slots"]
