"""The suite catches realistic bugs of paged-attention kernels (mutation testing).

Each mutant is one torch implementation of the serving ops, :func:`paged` (pages gathered
per sequence, scores by ``torch.matmul``, cap, ALiBi, mask, sinks as a zero-value score
column, softmax and logsumexp) and :func:`merge`, with one realistic bug switched on, run
through the real harness at the default profile (30 examples). The same implementations
with no bug must conform: they are the control that shows the harness blames the bug.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import pytest

pytest.importorskip("torch")

import torch

from lmspec.conformance.harness import checks_of

from .conftest import MutantBackend, run_checks

BLOCK = 16


class _GatherOverwrite(torch.autograd.Function):
    """``cache[pages]`` whose backward *copies* each page's gradient into place (the last
    reader of a shared page wins) instead of adding."""

    @staticmethod
    def forward(ctx: Any, cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pages)
        ctx.shape = cache.shape
        return cache.index_select(0, pages)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (pages,) = ctx.saved_tensors
        return torch.zeros(ctx.shape, dtype=grad.dtype).index_copy(0, pages, grad), None


def _keys(cache, row, n_k, bugs):
    """``[n_k (or more), g, ·]`` keys of one sequence."""
    page, n_p = cache.shape[1], cache.shape[0]
    flat = cache.reshape(n_p * page, *cache.shape[2:])
    t = torch.arange(n_k)
    if "fixed block" in bugs:  # a kernel that assumes pages of BLOCK slots
        idx = (row[t // BLOCK].clamp(0, n_p - 1) * page + t % BLOCK) % (n_p * page)
        return flat[idx]
    n = -(-n_k // page)
    if "table past kv_lens" in bugs:  # prefetches the next block-table entry
        n = min(n + 1, row.shape[0])
    pages = cache.index_select(0, row[:n])
    keys = pages.reshape(-1, *cache.shape[2:])
    return keys if {"garbage slot read", "table past kv_lens"} & bugs else keys[:n_k]


def paged(q, k_cache, v_cache, block_table, kv_lens, q_indptr, scale=None, is_causal=True,
          window=None, alibi_slopes=None, softcap=None, sinks=None, return_lse=False, *,
          bugs: frozenset[str] = frozenset()):
    n, h, e = q.shape
    g = k_cache.shape[2]
    sc = 1 / math.sqrt(e) if scale is None else scale
    ind, lens = q_indptr.tolist(), kv_lens.tolist()
    gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if "shared gradients overwritten" in bugs:
        page = k_cache.shape[1]
        spans = [(b, -(-s // page)) for b, s in enumerate(lens)]
        allp = torch.cat([block_table[b, :m] for b, m in spans])
        kp, vp = _GatherOverwrite.apply(k_cache, allp), _GatherOverwrite.apply(v_cache, allp)
        start = 0
        for b, m in spans:
            gathered[b] = (kp[start:start + m].reshape(-1, g, e)[:lens[b]],
                           vp[start:start + m].reshape(-1, g, v_cache.shape[-1])[:lens[b]])
            start += m
    outs, lses = [], []
    for b, n_k in enumerate(lens):
        n_q = ind[b + 1] - ind[b]
        if n_q == 0:
            continue
        k, v = gathered.get(b) or (_keys(k_cache, block_table[b], n_k, bugs),
                                   _keys(v_cache, block_table[b], n_k, bugs))
        s_len = k.shape[0]
        qb = q[ind[b]: ind[b + 1]]  # [L, h, E]
        rep = h // g
        ke, ve = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        s = torch.einsum("lhe,she->hls", qb, ke) * sc
        off = 0 if "top-left" in bugs else n_k - n_q
        rel = torch.arange(s_len)[None, :] - (off + torch.arange(n_q))[:, None]
        allow = torch.arange(s_len)[None, :] < n_k if "garbage slot read" not in bugs else (
            torch.ones(1, s_len, dtype=torch.bool))
        allow = allow.expand(n_q, s_len).clone()
        if "table past kv_lens" in bugs:
            allow &= torch.arange(s_len)[None, :] < n_k + 1
        if is_causal:
            allow &= rel <= 0
        if window is not None:
            left = window[0] if window[0] is None or "window off by one" not in bugs else (
                window[0] - 1)
            if left is not None:
                allow &= rel >= -left
            if window[1] is not None:
                allow &= rel <= window[1]
        capped = softcap is not None and "softcap ignored" not in bugs
        if capped and "softcap after the mask" not in bugs:
            s = softcap * torch.tanh(s / softcap)
        if alibi_slopes is not None:
            sl = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            s = s - sl[:, None, None] * rel.abs().to(s.dtype)
        s = s.masked_fill(~allow, -math.inf)
        if capped and "softcap after the mask" in bugs:
            s = softcap * torch.tanh(s / softcap)
        vals = ve.permute(1, 0, 2)  # [h, S, Ev]
        # one more score column: the sink (value 0), or −inf without one (no empty rows)
        col = (sinks[:, None, None].expand(h, n_q, 1).to(s.dtype) if sinks is not None else
               torch.full((h, n_q, 1), -math.inf, dtype=s.dtype))
        s = torch.cat([s, col], dim=-1)
        sink_v = 1 if "sink in the numerator" in bugs else 0
        vals = torch.cat([vals, torch.full((h, 1, vals.shape[-1]), sink_v, dtype=vals.dtype)],
                         dim=1)
        m = s.detach().amax(dim=-1, keepdim=True)
        ex = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
        tot = ex.sum(-1, keepdim=True)
        some = tot > 0
        p = ex / torch.where(some, tot, torch.ones_like(tot))
        lse = torch.where(some, torch.where(torch.isfinite(m), m, torch.zeros_like(m)) + torch.log(
            torch.where(some, tot, torch.ones_like(tot))), torch.full_like(tot, -math.inf))[..., 0]
        outs.append(torch.matmul(p, vals).permute(1, 0, 2))
        lses.append((lse / math.log(2) if "lse in log2" in bugs else lse).permute(1, 0))
    ev = v_cache.shape[-1]
    out = torch.cat(outs) if outs else v_cache.new_zeros((0, h, ev))
    if not return_lse:
        return out
    return out, torch.cat(lses) if lses else q.new_zeros((0, h))


def merge(outputs, lses, *, bugs: frozenset[str] = frozenset()):
    if "merge without the max shift" in bugs:
        w = torch.exp(lses)
        tot = w.sum(0)
        return (w[..., None] * outputs).sum(0) / tot[..., None], torch.log(tot)
    if "merge of -inf parts gives NaN" in bugs:  # the textbook weights exp(l − lse)
        lse = torch.logsumexp(lses, dim=0)
        w = torch.exp(lses - lse)
        return (w[..., None] * outputs).sum(0), lse
    m = lses.detach().amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    ex = torch.exp(lses - m)
    tot = ex.sum(0)
    some = tot > 0
    w = ex / torch.where(some, tot, torch.ones_like(tot))
    lse = torch.where(some, m + torch.log(torch.where(some, tot, torch.ones_like(tot))),
                      torch.full_like(tot, -math.inf))
    contrib = torch.where(w[..., None] > 0, w[..., None] * outputs, torch.zeros_like(outputs))
    return contrib.sum(0), lse


def _bug(fn, name):
    return partial(fn, bugs=frozenset({name}))


MUTANTS = {
    "page size assumed to be 16": ("paged_attention", "fixed block", "forward", "float64"),
    "block_table read past kv_lens": ("paged_attention", "table past kv_lens", "forward",
                                      "float64"),
    "top-left instead of bottom-right": ("paged_attention", "top-left", "forward", "float64"),
    "window left edge off by one": ("paged_attention", "window off by one", "forward",
                                    "float64"),
    "softcap after the mask": ("paged_attention", "softcap after the mask", "forward",
                               "float64"),
    "softcap ignored": ("paged_attention", "softcap ignored", "forward", "float64"),
    "sink added to the numerator": ("paged_attention", "sink in the numerator", "forward",
                                    "float64"),
    "LSE in log2": ("paged_attention", "lse in log2", "forward", "float64"),
    "garbage slot read (tail of the last page)": ("paged_attention", "garbage slot read",
                                                  "forward", "float64"),
    "shared pages' gradients overwritten": ("paged_attention", "shared gradients overwritten",
                                            "vjp", "float64"),
    "merge without the max shift": ("merge_attention_states", "merge without the max shift",
                                    "forward", "float32"),
    "merge of a -inf part gives NaN": ("merge_attention_states",
                                       "merge of -inf parts gives NaN", "forward", "float64"),
}


def _impl(op: str):
    return paged if op == "paged_attention" else merge


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(name):
    op, bug, check, dtype = MUTANTS[name]
    backend = MutantBackend({op: _bug(_impl(op), bug)})
    results = run_checks(backend, op, (dtype,), (check,), max_examples=30)
    caught = [r for r in results if r["status"] in ("fail", "error")]
    assert caught, f"{name} went unnoticed: {[(r['check'], r['status']) for r in results]}"
    assert caught[0]["counterexample"] is not None and caught[0]["reproduce"]


@pytest.mark.parametrize("op", ["paged_attention", "merge_attention_states"])
def test_the_same_implementations_without_bugs_conform(op):
    """The control: every check of the op, float32 and float64, passes."""
    backend = MutantBackend({op: _impl(op)})
    results = run_checks(backend, op, ("float32", "float64"), checks_of(op), max_examples=30)
    bad = [(r["check"], r["dtype"], r["status"], r["message"][:300]) for r in results
           if r["status"] != "pass"]
    assert not bad, bad


PROPERTY_KILLS = [
    ("top-left", "decode_equals_prefill_row"),
    ("fixed block", "repaging_changes_nothing"),
    ("softcap ignored", "options_take_effect"),
    ("sink in the numerator", "options_take_effect"),
]


@pytest.mark.parametrize("bug,check", PROPERTY_KILLS)
def test_properties_catch_without_the_reference(bug, check):
    backend = MutantBackend({"paged_attention": _bug(paged, bug)})
    results = run_checks(backend, "paged_attention", ("float64",), (check,), max_examples=30)
    assert [r["status"] for r in results] == ["fail"], results[0]["message"]
