"""Conformance inputs and properties of the serving family (paged KV-cache attention).

Inputs go where paged kernels break: page sizes 1, 2, 3, 5 and 16; pages in a random
physical order, a prefix of pages shared between sequences, NaN in every cache slot no
sequence reads (unused pages, the tail of each last page) and garbage integers (``−1``,
``P``, ``2³¹ − 1``, ``−2⁴⁰``, a valid page) in the ``block_table`` entries past each
sequence's needed pages; ``kv_lens`` on, one short of and one past a page boundary; empty
sequences (``L_b = 0``), decode (``L_b = 1``), chunked prefill (``1 < L_b < S_b``) and full
prefill (``L_b = S_b``) in one batch, and without ``is_causal`` more queries than keys and
sequences with no key (queries that see no key); sliding windows narrower than a page and
wider than the sequence; ALiBi per head and per sequence; soft-capping of scores far above
the cap; attention sinks large (they dominate), small and very negative; scores below
``−5·10⁴`` (float32/float64); with and without the LSE output.

Tolerance magnitudes, as for ``grouped_query_attention`` (:mod:`.cases_modern`): the output
is a convex combination of the values read, so ``M = max(1, max|v|)·max(1, |s|)`` with
``|s|`` bounded by ``|scale|·Σ|q||k|`` (by ``softcap`` under a cap), plus the largest ALiBi
bias and the largest ``|sink|``; the LSE is of the scores' size. Only the slots that are
read count (the others hold NaN). A vjp's ``M`` is multiplied by ``max|cotangent|`` and
the largest scaled ``|q|`` or ``|k|``.

Properties, none of which consults the reference: invariance under a permutation of the
physical pages, under re-paging to another page size and under removing other sequences
from the batch; decoding a query equals the matching row of the prefill; attention over a
key set equals the merge of attention over a prefix and the rest (cascade); ``window``,
``alibi_slopes``, ``sinks`` and ``softcap`` each change the output where they must. The
merge is associative and indifferent to the order of the parts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from lmspec.serving import slots

from . import draw as d
from . import large_shapes as big
from .cases_attention import _abs, _grad_factor, _values
from .cases_modern import alibi_slopes
from .declare import Call, Close, Holds, cases, prop

PAGES = (3, 1, 2, 16, 5)
GARBAGE = ("-1", "P", "2**31 - 1", "-2**40", "a valid page", "0")
OPTS = ("scale", "is_causal", "window", "alibi_slopes", "softcap", "sinks")
"""The options after the six layout arguments, passed positionally so that the vjp check
compares the gradient of ``sinks`` (the harness compares positional arguments)."""

# -- layout ---------------------------------------------------------------------------------


def _lengths(draw, page: int, causal: bool) -> tuple[int, int]:
    """``(L_b, S_b)`` of one sequence."""
    kinds = ["decode", "chunked prefill", "full prefill", "empty"] + (
        [] if causal else ["more queries than keys"] * 3 + ["no key"])
    kind = draw(st.sampled_from(kinds), label="sequence kind")
    if kind == "no key":
        return d.dim(draw, 1, 2, label="L"), 0
    m = d.dim(draw, 1, 2 if page <= 3 else 1, label="pages")
    s_kind = draw(st.sampled_from(["one past a page", "on a page", "one short", "small"]),
                  label="kv_len kind")
    s = {"on a page": m * page, "one past a page": m * page + 1,
         "one short": max(1, m * page - 1), "small": d.dim(draw, 1, 4, label="S")}[s_kind]
    if kind == "decode":
        return 1, s
    if kind == "empty":
        return 0, s
    if kind == "full prefill":
        return min(s, 17), s
    if kind == "more queries than keys":
        return s + d.dim(draw, 1, 2, label="extra queries"), s
    return (d.dim(draw, 2, min(s - 1, 5), label="L") if s >= 3 else 1), s


def _garbage(draw, n_pages: int, label: str) -> int:
    kind = draw(st.sampled_from(GARBAGE), label=label)
    return {"-1": -1, "P": n_pages, "2**31 - 1": 2**31 - 1, "-2**40": -(2**40), "0": 0,
            "a valid page": max(0, n_pages - 1)}[kind]


def _nan_unread(cache: np.ndarray, read: np.ndarray) -> np.ndarray:
    flat = cache.reshape(-1, *cache.shape[2:]).copy()
    flat[~read] = np.nan
    return flat.reshape(cache.shape)


def read_slots(block_table, kv_lens, page: int, n_pages: int) -> np.ndarray:
    """Which of the ``P·page`` flat slots some sequence reads."""
    read = np.zeros(n_pages * page, dtype=bool)
    for row, n_k in zip(block_table, kv_lens):
        read[slots(row, int(n_k), page)] = True
    return read


@st.composite
def _paged(draw, dtype: str, *, causal: bool | None = None, page: int | None = None) -> Call:
    """A batch of sequences in a paged cache (see the module docstring)."""
    is_causal = draw(st.booleans(), label="is_causal") if causal is None else causal
    page = draw(st.sampled_from(PAGES), label="page") if page is None else page
    ratio = draw(st.sampled_from([1, 2, 4]), label="h/g")
    g = d.dim(draw, 1, 2, label="g")
    h, e, ev = g * ratio, draw(st.sampled_from([2, 3, 1, 5]), label="E"), d.dim(
        draw, 1, 3, label="Ev")
    b = d.dim(draw, 1, 3, label="B")
    seqs = [_lengths(draw, page, is_causal) for _ in range(b)]
    need = [-(-s // page) for _, s in seqs]
    share = draw(st.booleans(), label="share a prefix") if b > 1 and need[0] else False
    logical, nxt = [], 0
    for i, n in enumerate(need):
        k = min(n, need[0], d.dim(draw, 1, need[0], label="shared pages")) if (
            share and i) else 0
        logical.append(list(logical[0][:k]) + list(range(nxt, nxt + n - k)) if i else
                       list(range(n)))
        nxt += n - k if i else n
    n_pages = nxt + d.dim(draw, 0, 2, label="unused pages")
    perm = np.array(draw(st.permutations(list(range(n_pages))), label="physical order"),
                    dtype=np.int64)
    width = max(need + [1]) + d.dim(draw, 0, 2, label="extra block_table columns")
    bt = np.zeros((b, width), dtype=np.int64)
    for i, pages in enumerate(logical):
        bt[i, : len(pages)] = perm[np.array(pages, dtype=np.int64)]
        for j in range(len(pages), width):
            bt[i, j] = _garbage(draw, n_pages, "block_table garbage")
    lens = np.array([s for _, s in seqs], dtype=np.int64)
    ind = np.concatenate([[0], np.cumsum([n for n, _ in seqs])]).astype(np.int64)
    big_scores = dtype in ("float32", "float64") and draw(st.booleans(), label="huge scores")
    q = _values(draw, dtype, (int(ind[-1]), h, e), label="q", extreme=True)
    kc = (d.floats(draw, dtype, (n_pages, page, g, e), -300, 300, label="k_cache")
          if big_scores else _values(draw, dtype, (n_pages, page, g, e), label="k_cache"))
    vc = _values(draw, dtype, (n_pages, page, g, ev), label="v_cache")
    read = read_slots(bt, lens, page, n_pages)
    kc, vc = _nan_unread(kc, read), _nan_unread(vc, read)
    longest = int(max(lens.max(initial=0), np.diff(ind).max(initial=0)))
    windows = ["none", "none", "(w - 1, 0), w < page", "wider than the sequence", "(0, 0)"] + (
        [] if is_causal else ["(1, 1)", "(2, None)", "(None, 0)"])
    wk = draw(st.sampled_from(windows), label="window kind")
    window = {"none": None, "(0, 0)": (0, 0), "(1, 1)": (1, 1), "(2, None)": (2, None),
              "(None, 0)": (None, 0), "wider than the sequence": (longest + 3, longest + 3),
              "(w - 1, 0), w < page": (d.dim(draw, 1, 2, label="w") - 1, 0)}[wk]
    return Call((q, kc, vc, bt, lens, ind,
                 draw(st.sampled_from([None, None, 0.125, 1.0, -0.5]), label="scale"),
                 is_causal, window, alibi_slopes(draw, dtype, b, h),
                 draw(st.sampled_from([None, None, None, None, 1.0, 30.0]), label="softcap"),
                 _sinks(draw, dtype, h)),
                {"return_lse": draw(st.sampled_from([False, False, True]), label="return_lse")})


def _sinks(draw, dtype: str, h: int):
    kind = draw(st.sampled_from(["none"] * 6 + ["small", "large", "very negative"]),
                label="sinks kind")
    lo, hi = {"none": (0, 0), "small": (-2, 2), "large": (10, 30),
              "very negative": (-30, -10)}[kind]
    return None if kind == "none" else d.floats(draw, dtype, (h,), lo, hi, label="sinks")


NAMES = ("q", "k_cache", "v_cache", "block_table", "kv_lens", "q_indptr", *OPTS)


def _unpack(call: Call) -> dict[str, Any]:
    return dict(zip(NAMES, call.args))


def _read(call: Call) -> tuple[np.ndarray, np.ndarray]:
    """The keys and values that are read, float64, ``[R, g, ·]``."""
    a = _unpack(call)
    kc, vc = a["k_cache"], a["v_cache"]
    r = read_slots(a["block_table"], a["kv_lens"], kc.shape[1], kc.shape[0])
    return (_abs(kc.reshape(-1, *kc.shape[2:])[r]), _abs(vc.reshape(-1, *vc.shape[2:])[r]))


def _paged_scale(call: Call, cot=None) -> float:
    a = _unpack(call)
    q = _abs(a["q"])
    kr, vr = _read(call)
    s = 1 / math.sqrt(q.shape[-1]) if a["scale"] is None else abs(a["scale"])
    qm = q.max(axis=(0, 1), initial=0.0) if q.size else np.zeros(q.shape[-1])
    km = kr.max(axis=(0, 1), initial=0.0) if kr.size else np.zeros(q.shape[-1])
    e = s * float(qm @ km)
    if a["softcap"] is not None:
        e = min(e, a["softcap"])
    if a["alibi_slopes"] is not None:
        dist = int(max(a["kv_lens"].max(initial=0), np.diff(a["q_indptr"]).max(initial=0)))
        e += float(np.max(_abs(a["alibi_slopes"]), initial=0.0)) * dist
    if a["sinks"] is not None:
        e = max(e, float(np.max(_abs(a["sinks"]), initial=0.0)))
    m = max(1.0, float(np.max(vr, initial=0.0))) * max(1.0, e)
    return m * _grad_factor(cot, s * q, s * kr)


def _paged_k(call: Call) -> int:
    a = _unpack(call)
    return a["q"].shape[-1] + int(a["kv_lens"].max(initial=0)) + 1


@st.composite
def _paged_large(draw, dtype: str) -> Call:
    """Large tier: pages of 16 and 128, up to 4096 keys, head dimensions 64/128/256, GQA
    ratios 1/4/8; decode (``L = 1``) or a chunk of 17 queries; a sliding window of a page."""
    page = big.size(draw, (16, 128), "page")
    n_k = big.size(draw, (129, 4096, 127, 2049), "S")
    n_q = draw(st.sampled_from([1, 17]), label="L")
    e = big.size(draw, (128, 64, 256), "E")
    g = 1 if e == 256 else draw(st.sampled_from([1, 2]), label="g")
    h = g * big.size(draw, (4, 1, 8), "h/g")
    b = 1 if n_k > 2048 else big.size(draw, (2, 1), "B")
    need = -(-n_k // page)
    n_pages = b * need + 1
    perm = big.rng(draw, "physical order").permutation(n_pages)
    bt = np.concatenate([perm[i * need:(i + 1) * need][None] for i in range(b)])
    bt = np.concatenate([bt, np.full((b, 1), -1)], axis=1).astype(np.int64)
    lens = np.full(b, n_k, dtype=np.int64)
    ind = np.arange(b + 1, dtype=np.int64) * n_q
    q = d.floats(draw, dtype, (b * n_q, h, e), label="q")
    kc = d.floats(draw, dtype, (n_pages, page, g, e), label="k_cache")
    vc = d.floats(draw, dtype, (n_pages, page, g, e), label="v_cache")
    read = read_slots(bt, lens, page, n_pages)
    window = draw(st.sampled_from([None, (page - 1, 0)]), label="window")
    return Call((q, _nan_unread(kc, read),
                 _nan_unread(vc, read), bt, lens, ind, None, True, window, None,
                 draw(st.sampled_from([None, 30.0]), label="softcap"), None),
                {"return_lse": draw(st.sampled_from([False, False, True]), label="return_lse")})


cases("paged_attention", k=_paged_k, scale=_paged_scale, large=_paged_large)(_paged)


# -- properties of paged_attention ------------------------------------------------------------


def _run(run, call: Call, **changes) -> tuple[Any, Any]:
    """``(out, lse)`` of the backend on ``call`` with some arguments replaced (``lse`` None
    without ``return_lse``)."""
    want_lse = changes.pop("return_lse", call.kwargs["return_lse"])
    a = {**_unpack(call), **changes}
    got = run("paged_attention", *(a[n] for n in NAMES), return_lse=want_lse)
    return tuple(got) if want_lse else (got, None)


def _same(what: str, got, want, call: Call) -> list[Close]:
    claims = [Close(what, got[0], want[0], k=_paged_k(call), scale=_paged_scale(call))]
    if got[1] is not None:
        claims.append(Close(what + " (lse)", got[1], want[1], k=_paged_k(call),
                            scale=_paged_scale(call)))
    return claims


@st.composite
def _with_permutation(draw, dtype: str):
    call = draw(_paged(dtype))
    n = call.args[1].shape[0]
    return call, np.array(draw(st.permutations(list(range(n))), label="new order"),
                          dtype=np.int64)


@prop("paged_attention", strategy=_with_permutation)
def physical_page_order_changes_nothing(run, drawn, dtype: str):
    """Moving page p to physical index π(p) and rewriting the block table to match (the
    entries each sequence reads; the others keep their garbage) changes nothing."""
    call, pi = drawn
    a = _unpack(call)
    bt, page = a["block_table"].copy(), a["k_cache"].shape[1]
    inv = np.argsort(pi)
    for i, n_k in enumerate(a["kv_lens"]):
        n = -(-int(n_k) // page)
        bt[i, :n] = pi[bt[i, :n]]
    yield from _same("paged(π(pages), π(block_table)) = paged(pages, block_table)",
                     _run(run, call, k_cache=a["k_cache"][inv], v_cache=a["v_cache"][inv],
                          block_table=bt), _run(run, call), call)


def repage(call: Call, new_page: int, start: np.ndarray | None = None):
    """Each sequence's keys/values from slot ``start[b]`` on, copied into fresh pages of
    ``new_page`` slots (sequence after sequence, NaN in the tails, ``−1`` past the needed
    entries): ``(k_cache, v_cache, block_table, kv_lens)``."""
    a = _unpack(call)
    kc, vc, page = a["k_cache"], a["v_cache"], a["k_cache"].shape[1]
    lens = a["kv_lens"] - (0 if start is None else start)
    need = [-(-int(n) // new_page) for n in lens]
    total = sum(need) + 1
    k2 = np.full((total * new_page, *kc.shape[2:]), np.nan, dtype=kc.dtype)
    v2 = np.full((total * new_page, *vc.shape[2:]), np.nan, dtype=vc.dtype)
    bt = np.full((len(lens), max(need + [1])), -1, dtype=np.int64)
    nxt = 0
    for i, n_k in enumerate(a["kv_lens"]):
        idx = slots(a["block_table"][i], int(n_k), page)[0 if start is None else int(start[i]):]
        k2[nxt * new_page: nxt * new_page + len(idx)] = kc.reshape(-1, *kc.shape[2:])[idx]
        v2[nxt * new_page: nxt * new_page + len(idx)] = vc.reshape(-1, *vc.shape[2:])[idx]
        bt[i, : need[i]] = np.arange(nxt, nxt + need[i])
        nxt += need[i]
    return (k2.reshape(total, new_page, *kc.shape[2:]),
            v2.reshape(total, new_page, *vc.shape[2:]), bt, lens.astype(np.int64))


@st.composite
def _with_page(draw, dtype: str):
    call = draw(_paged(dtype))
    return call, draw(st.sampled_from([p for p in (1, 2, 3, 16, 7)
                                       if p != call.args[1].shape[1]]), label="new page")


@prop("paged_attention", strategy=_with_page)
def repaging_changes_nothing(run, drawn, dtype: str):
    """The same keys and values laid out in pages of another size give the same result."""
    call, new_page = drawn
    k2, v2, bt, lens = repage(call, new_page)
    yield from _same(f"paged(page = {new_page}) = paged(page = {call.args[1].shape[1]})",
                     _run(run, call, k_cache=k2, v_cache=v2, block_table=bt, kv_lens=lens),
                     _run(run, call), call)


@st.composite
def _with_subset(draw, dtype: str):
    call = draw(_paged(dtype))
    b = len(call.args[4])
    keep = d.bools(draw, (b,), label="kept sequences")
    keep[d.dim(draw, 0, b - 1, label="one kept")] = True
    return call, keep


@prop("paged_attention", strategy=_with_subset)
def other_sequences_change_nothing(run, drawn, dtype: str):
    """Running a subset of the batch's sequences (same cache) gives their rows of the whole
    batch's result: sequences do not see each other."""
    call, keep = drawn
    a = _unpack(call)
    ind = a["q_indptr"]
    rows = np.concatenate([np.arange(ind[i], ind[i + 1]) for i in np.flatnonzero(keep)]
                          + [np.zeros(0, np.int64)]).astype(np.int64)
    sub_ind = np.concatenate([[0], np.cumsum(np.diff(ind)[keep])]).astype(np.int64)
    slopes = a["alibi_slopes"]
    if slopes is not None and slopes.ndim == 2:
        slopes = slopes[keep]
    whole = _run(run, call)
    part = _run(run, call, q=a["q"][rows], block_table=a["block_table"][keep],
                kv_lens=a["kv_lens"][keep], q_indptr=sub_ind, alibi_slopes=slopes)
    yield from _same("paged(subset of sequences) = those rows of paged(batch)", part,
                     (whole[0][rows], None if whole[1] is None else whole[1][rows]), call)


@st.composite
def _with_rows(draw, dtype: str):
    call = draw(_paged(dtype, causal=True))
    n_q = np.diff(call.args[5])
    return call, [d.dim(draw, 0, n - 1, label="decoded row") if n else -1 for n in n_q]


@prop("paged_attention", strategy=_with_rows)
def decode_equals_prefill_row(run, drawn, dtype: str):
    """Decoding query i of a sequence alone, with kv_len = S_b − L_b + i + 1 (the keys up to
    its own position), gives row i of the batch's causal result."""
    call, pick = drawn
    a = _unpack(call)
    ind, lens = a["q_indptr"], a["kv_lens"]
    live = [i for i, p in enumerate(pick) if p >= 0]
    if not live:
        return
    rows = np.array([ind[i] + pick[i] for i in live], dtype=np.int64)
    dec_lens = np.array([lens[i] - (ind[i + 1] - ind[i]) + pick[i] + 1 for i in live],
                        dtype=np.int64)
    slopes = a["alibi_slopes"]
    if slopes is not None and slopes.ndim == 2:
        slopes = slopes[live]
    whole = _run(run, call)
    dec = _run(run, call, q=a["q"][rows], block_table=a["block_table"][live],
               kv_lens=dec_lens, q_indptr=np.arange(len(live) + 1, dtype=np.int64),
               alibi_slopes=slopes)
    yield from _same("decode(row i, kv_len = position + 1) = row i of prefill", dec,
                     (whole[0][rows], None if whole[1] is None else whole[1][rows]), call)


def merge_literal(outs: list[np.ndarray], lses: list[np.ndarray]):
    """``Σ_s exp(l_s − L)·o_s``, ``L = ln Σ_s exp(l_s)`` in float64 (parts at ``−inf``
    contribute nothing; all ``−inf`` gives zeros and ``−inf``)."""
    ls = np.stack(lses)
    m = np.max(ls, axis=0)
    m = np.where(np.isfinite(m), m, 0.0)
    w = np.exp(ls - m)
    tot = w.sum(axis=0)
    lse = np.where(tot > 0, m + np.log(np.where(tot > 0, tot, 1.0)), -np.inf)
    wn = np.where(tot > 0, w / np.where(tot > 0, tot, 1.0), 0.0)
    out = sum(np.where(wn[i][..., None] > 0, wn[i][..., None] * outs[i], 0.0)
              for i in range(len(outs)))
    return out, lse


@st.composite
def _with_cut(draw, dtype: str):
    call = draw(_paged(dtype))
    a = _unpack(call)
    room = a["kv_lens"] - (np.diff(a["q_indptr"]) if a["is_causal"] else 1)
    return call, np.array([d.dim(draw, 0, max(0, int(n)), label="prefix") for n in room],
                          dtype=np.int64)


@prop("paged_attention", strategy=_with_cut)
def cascade_equals_whole(run, drawn, dtype: str):
    """Attention over a sequence's keys equals the merge of attention over a prefix that
    precedes every query (no mask needed; only the sequences with a non-empty prefix are
    run) and attention over the rest (in fresh pages of 2), both with their LSE (cascade
    attention; no window or ALiBi, which depend on absolute distances; the sinks counted
    once, in the second part)."""
    call, cut = drawn
    a = _unpack(call)
    base = {"window": None, "alibi_slopes": None, "return_lse": True}
    whole = _run(run, call, **base)
    k2, v2, bt, lens = repage(call, 2, cut)
    rest = _run(run, call, **base, k_cache=k2, v_cache=v2, block_table=bt, kv_lens=lens)
    pre = (np.zeros_like(rest[0]), np.full(rest[1].shape, -np.inf))
    some = cut > 0
    if some.any():
        ind = a["q_indptr"]
        rows = np.concatenate([np.arange(ind[i], ind[i + 1]) for i in np.flatnonzero(some)]
                              + [np.zeros(0, np.int64)]).astype(np.int64)
        got = _run(run, call, **{**base, "q": a["q"][rows], "block_table":
                                 a["block_table"][some], "kv_lens": cut[some], "q_indptr":
                                 np.concatenate([[0], np.cumsum(np.diff(ind)[some])]).astype(
                                     np.int64), "is_causal": False, "sinks": None})
        pre[0][rows], pre[1][rows] = got
    plain = Call(call.args[:8] + (None, None) + call.args[10:], call.kwargs)
    yield from _same("merge(prefix, rest) = whole", merge_literal(
        [pre[0], rest[0]], [pre[1], rest[1]]), whole, plain)


OPTION_CHECKS = ("window", "alibi_slopes", "sinks", "softcap")


@st.composite
def _with_option(draw, dtype: str):
    call = draw(_paged(dtype, causal=True))
    return call, draw(st.sampled_from(OPTION_CHECKS), label="option")


def _positions(call: Call) -> tuple[np.ndarray, np.ndarray]:
    """Each read slot's position in its sequence (shared pages hold a shared prefix, so one
    position per slot), and each query row's position."""
    a = _unpack(call)
    kc = a["k_cache"]
    pos = np.full(kc.shape[0] * kc.shape[1], -1, dtype=np.int64)
    for row, n_k in zip(a["block_table"], a["kv_lens"]):
        pos[slots(row, int(n_k), kc.shape[1])] = np.arange(int(n_k))
    ind, lens = a["q_indptr"], a["kv_lens"]
    qpos = np.concatenate([lens[i] - (ind[i + 1] - ind[i]) + np.arange(ind[i + 1] - ind[i])
                           for i in range(len(lens))] + [np.zeros(0, np.int64)])
    return pos, qpos.astype(np.int64)


@prop("paged_attention", strategy=_with_option)
def options_take_effect(run, drawn, dtype: str):
    """With designed values each option moves every query that sees two or more keys by
    more than 0.1: window (0, 0) (a query then reads its own position, not the mean of the
    positions up to it), ALiBi slopes of 2 (near keys win), a sink of 3 (it takes weight
    from values that are all 1) and a softcap of 1 (scores of 8 on even positions become
    tanh(8) ≈ 1). A kernel that accepts an option and ignores it fails."""
    call, option = drawn
    a = _unpack(call)
    pos, qpos = _positions(call)
    many = qpos >= 1
    if not many.any():
        return
    q, kc, vc = (np.zeros_like(a[n]) for n in ("q", "k_cache", "v_cache"))
    h, dt = q.shape[1], q.dtype
    vflat = vc.reshape(-1, *vc.shape[2:])
    vflat[..., 0] = np.where(pos >= 0, pos, 0)[:, None]
    base = {"q": q, "k_cache": kc, "v_cache": vc, "scale": 1.0, "window": None,
            "alibi_slopes": None, "softcap": None, "sinks": None, "return_lse": False}
    on: dict[str, Any] = {"window": {"window": (0, 0)},
                          "alibi_slopes": {"alibi_slopes": np.full(h, 2.0, dtype=dt)},
                          "sinks": {"sinks": np.full(h, 3.0, dtype=dt)},
                          "softcap": {"softcap": 1.0}}[option]
    if option == "sinks":
        vflat[..., 0] = 1
    if option == "softcap":
        even = (pos >= 0) & (pos % 2 == 0)
        kc.reshape(-1, *kc.shape[2:])[..., 0] = even[:, None]
        vflat[..., 0] = even[:, None]
        q[..., 0] = 8
    without = _run(run, call, **base)[0][..., 0]
    with_ = _run(run, call, **{**base, **on})[0][..., 0]
    gap = np.abs(with_ - without)[many]
    yield Holds(f"{option} changes every output that sees two or more keys",
                bool(np.all(gap > 0.1)), f"smallest change {float(np.min(gap)):.3g}")


# -- merge_attention_states -----------------------------------------------------------------


@st.composite
def _merge(draw, dtype: str) -> Call:
    s, n, h, ev = (d.dim(draw, 1, 4, label="S"), d.dim(draw, 1, 3, label="N"),
                   d.dim(draw, 1, 2, label="h"), d.dim(draw, 1, 3, label="Ev"))
    outs = _values(draw, dtype, (s, n, h, ev), label="outputs")
    regime = draw(st.sampled_from(["normal", "spread", "large"]), label="lse regime")
    lo, hi = {"normal": (-5, 5), "spread": (-60, 60), "large": (200, 400)}[regime]
    ls = d.floats(draw, dtype, (s, n, h), lo, hi, label="lses")
    dead = draw(st.sampled_from(["none", "some parts", "a whole row", "everything"]),
                label="parts with no key")
    if dead == "some parts":
        ls = np.where(d.bools(draw, ls.shape, label="dead"), -np.inf, ls).astype(ls.dtype)
    elif dead == "a whole row":
        ls[:, d.dim(draw, 0, n - 1, label="row")] = -np.inf
    elif dead == "everything":
        ls[...] = -np.inf
    return Call((outs, ls), {})


def _merge_scale(call: Call, cot=None) -> float:
    o, ls = (_abs(a) for a in call.args)
    fin = ls[np.isfinite(ls)]
    m = max(1.0, float(np.max(o, initial=0.0))) * max(1.0, float(np.max(fin, initial=0.0)))
    return m * _grad_factor(cot, o)


cases("merge_attention_states", k=lambda c: c.args[0].shape[0] + 1, scale=_merge_scale)(_merge)


@st.composite
def _merge_split(draw, dtype: str):
    call = draw(_merge(dtype))
    s = call.args[0].shape[0]
    return call, d.dim(draw, 0, s, label="split"), np.array(
        draw(st.permutations(list(range(s))), label="order"), dtype=np.int64)


@prop("merge_attention_states", strategy=_merge_split)
def merge_is_associative_and_unordered(run, drawn, dtype: str):
    """Merging all parts equals merging the merges of a split of them (split-KV within
    split-KV), and the order of the parts does not matter."""
    call, c, order = drawn
    o, ls = call.args
    whole = run("merge_attention_states", o, ls)
    k, m = o.shape[0] + 1, _merge_scale(call)
    yield Close("merge(permuted parts) = merge(parts)",
                run("merge_attention_states", o[order], ls[order])[0], whole[0], k=k, scale=m)
    if 0 < c < o.shape[0]:
        a = run("merge_attention_states", o[:c], ls[:c])
        b = run("merge_attention_states", o[c:], ls[c:])
        two = run("merge_attention_states", np.stack([a[0], b[0]]).astype(o.dtype),
                  np.stack([a[1], b[1]]).astype(ls.dtype))
        yield Close("merge(merge(first), merge(rest)) = merge(all)", two[0], whole[0],
                    k=k, scale=m)
        yield Close("lse of merge(merge(first), merge(rest)) = lse of merge(all)", two[1],
                    whole[1], k=k, scale=m)
