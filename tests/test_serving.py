"""The serving family: ``paged_attention`` against ``grouped_query_attention`` sequence by
sequence and against a literal per-query loop written from the contract, its vjp (and
``merge_attention_states``') against float64 central differences for every differentiable
argument, input validation, and the built-in backends through the harness."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lmspec
from lmspec.conformance.harness import checks_of
from lmspec.conformance.oracles import finite_difference_vjp
from lmspec.serving import slots

from .conftest import run_checks

RNG = np.random.default_rng(20261206)
SERVING = ("paged_attention", "merge_attention_states")


def r(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def layout(page: int, h: int = 4, g: int = 2, e: int = 3, ev: int = 2, garbage=np.nan):
    """Three sequences (prefill, empty, decode) in shuffled, partly shared pages, with
    ``garbage`` in every slot nobody reads and past the needed block-table entries."""
    lens = np.array([2 * page + 1, page, page + 2])
    n_q = np.array([2 * page + 1, 0, 1])
    ind = np.concatenate([[0], np.cumsum(n_q)])
    need = [-(-int(n) // page) for n in lens]
    perm = RNG.permutation(8)
    tables = [perm[:3], perm[3:4], np.array([perm[0], *perm[4:3 + need[2]]])]  # shares a page
    bt = np.full((3, 4), 2**40, dtype=np.int64)
    for b, t in enumerate(tables):
        bt[b, : need[b]] = t
    bt[1, 1] = -3
    kc, vc = r(8, page, g, e), r(8, page, g, ev)
    read = np.zeros(8 * page, bool)
    for b in range(3):
        read[slots(bt[b], int(lens[b]), page)] = True
    kc.reshape(-1, g, e)[~read] = garbage
    vc.reshape(-1, g, ev)[~read] = garbage
    return r(int(ind[-1]), h, e), kc, vc, bt, lens, ind, read


def literal(q, kc, vc, bt, lens, ind, scale=None, is_causal=True, window=None,
            alibi_slopes=None, softcap=None, sinks=None):
    """The contract, one query row and head at a time, in plain Python floats."""
    n, h, e = q.shape
    page, g, ev = kc.shape[1], kc.shape[2], vc.shape[3]
    sc = 1 / math.sqrt(e) if scale is None else scale
    out, lse = np.zeros((n, h, ev)), np.full((n, h), -math.inf)
    for b in range(len(lens)):
        s_b, l_b = int(lens[b]), int(ind[b + 1] - ind[b])
        for i in range(l_b):
            row, pos = int(ind[b]) + i, s_b - l_b + i
            for j in range(h):
                kv = j // (h // g)
                terms = []
                for t in range(s_b):
                    if is_causal and t > pos:
                        continue
                    if window is not None:
                        if window[0] is not None and t - pos < -window[0]:
                            continue
                        if window[1] is not None and t - pos > window[1]:
                            continue
                    pg, sl = int(bt[b, t // page]), t % page
                    x = sc * sum(float(q[row, j, c]) * float(kc[pg, sl, kv, c]) for c in range(e))
                    if softcap is not None:
                        x = softcap * math.tanh(x / softcap)
                    if alibi_slopes is not None:
                        slope = alibi_slopes[j] if alibi_slopes.ndim == 1 else alibi_slopes[b, j]
                        x -= float(slope) * abs(pos - t)
                    terms.append((x, vc[pg, sl, kv]))
                if sinks is not None:
                    terms.append((float(sinks[j]), np.zeros(ev)))
                if not terms:
                    continue
                m = max(x for x, _ in terms)
                den = sum(math.exp(x - m) for x, _ in terms)
                out[row, j] = sum(math.exp(x - m) * val for x, val in terms) / den
                lse[row, j] = m + math.log(den)
    return out, lse


OPTIONS = [
    {},
    {"window": (1, 0)},
    {"window": (0, 0), "softcap": 1.5, "scale": -0.7},
    {"alibi_slopes": np.array([0.5, 0.25, 0.125, 1.0]), "sinks": np.array([0.3, -2, 4, 0])},
    {"alibi_slopes": np.abs(r(3, 4)), "window": (None, 0), "softcap": 3.0},
    {"is_causal": False, "window": (2, 1), "sinks": np.array([5.0, -1, 0, 1])},
]


@pytest.mark.parametrize("page", [1, 2, 3, 16])
@pytest.mark.parametrize("opts", OPTIONS, ids=[str(i) for i in range(len(OPTIONS))])
def test_equals_literal_loop_and_ignores_garbage(page, opts):
    q, kc, vc, bt, lens, ind, _ = layout(page)
    out, lse = lmspec.paged_attention(q, kc, vc, bt, lens, ind, return_lse=True, **opts)
    want, want_lse = literal(q, kc, vc, bt, lens, ind, **opts)
    np.testing.assert_allclose(out, want, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, atol=1e-13)
    assert np.array_equal(lmspec.paged_attention(q, kc, vc, bt, lens, ind, **opts), out)


@pytest.mark.parametrize("opts", OPTIONS[:5], ids=[str(i) for i in range(5)])
def test_equals_grouped_query_attention_per_sequence(opts):
    q, kc, vc, bt, lens, ind, _ = layout(3)
    kw = {k: w for k, w in opts.items() if k != "sinks"}
    out = lmspec.paged_attention(q, kc, vc, bt, lens, ind, **kw)
    g = kc.shape[2]
    for b in range(len(lens)):
        lo, hi = ind[b], ind[b + 1]
        if hi == lo:
            continue
        idx = slots(bt[b], int(lens[b]), 3)
        k = kc.reshape(-1, g, 3)[idx].transpose(1, 0, 2)[None]
        v = vc.reshape(-1, g, 2)[idx].transpose(1, 0, 2)[None]
        slopes = kw.get("alibi_slopes")
        if slopes is not None and slopes.ndim == 2:
            slopes = slopes[b]
        want = lmspec.grouped_query_attention(
            q[lo:hi].transpose(1, 0, 2)[None], k, v, is_causal=kw.get("is_causal", True),
            scale=kw.get("scale"), q_offset=int(lens[b]) - int(hi - lo),
            window=kw.get("window"), alibi_slopes=slopes, softcap=kw.get("softcap"))
        np.testing.assert_allclose(out[lo:hi], want[0].transpose(1, 0, 2), atol=1e-14)


def test_query_without_keys_gives_zeros_and_lse():
    q, kc, vc = r(3, 2, 2), r(1, 2, 1, 2), r(1, 2, 1, 2)
    bt, lens, ind = np.array([[0]]), np.array([1]), np.array([0, 3])
    kw = {"is_causal": False, "window": (0, 0)}  # positions -2, -1, 0: only the last sees key 0
    out, lse = lmspec.paged_attention(q, kc, vc, bt, lens, ind, return_lse=True, **kw)
    assert np.all(out[:2] == 0) and np.all(lse[:2] == -np.inf) and np.all(np.isfinite(lse[2]))
    sinks = np.array([0.5, -1.0])
    out, lse = lmspec.paged_attention(q, kc, vc, bt, lens, ind, sinks=sinks, return_lse=True,
                                      **kw)
    assert np.all(out[:2] == 0) and np.array_equal(lse[:2], np.stack([sinks, sinks]))
    empty = lmspec.paged_attention(q, kc, vc, bt, np.array([0]), ind, is_causal=False,
                                   return_lse=True)
    assert np.all(empty[0] == 0) and np.all(empty[1] == -np.inf)


# -- vjps against finite differences ---------------------------------------------------------

def check_vjp(op, args, kwargs, cot, atol=1e-6):
    grads = lmspec.vjp(op, args, kwargs, cot)
    want = finite_difference_vjp(op, args, kwargs, cot)
    for name, g, w, a in zip(lmspec.OPS[op].params, grads, want, args, strict=False):
        if name not in lmspec.OPS[op].diff or a is None:
            assert g is None, name
            continue
        np.testing.assert_allclose(g, np.nan_to_num(w), atol=atol, rtol=1e-5,
                                   err_msg=f"{op} {name}")
    return grads


def _positional(q, kc, vc, bt, lens, ind, opts):
    names = lmspec.OPS["paged_attention"].params[6:12]
    defaults = {"scale": None, "is_causal": True, "window": None, "alibi_slopes": None,
                "softcap": None, "sinks": None}
    vals = [opts.get(n, defaults[n]) for n in names]
    vals[2] = None if vals[2] is None else list(vals[2])  # the oracle would widen a tuple
    return (q, kc, vc, bt, lens, ind, *vals)


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("opts", [OPTIONS[2], OPTIONS[3], OPTIONS[4],
                                  {"sinks": np.array([1.0, -0.5, 2, 0]), "softcap": 2.0}])
def test_paged_attention_vjp(opts, return_lse):
    q, kc, vc, bt, lens, ind, read = layout(2, garbage=0.0)
    args = _positional(q, kc, vc, bt, lens, ind, opts)
    out = lmspec.paged_attention(*args, return_lse=return_lse)
    cot = (r(*out[0].shape), r(*out[1].shape)) if return_lse else r(*out.shape)
    grads = check_vjp("paged_attention", args, {"return_lse": return_lse}, cot)
    dk = grads[1].reshape(-1, 2, 3)
    assert np.all(dk[~read] == 0)
    assert np.any(dk[read] != 0) or opts.get("window") == (0, 0)  # one key each: ∂k = 0


def test_gradients_of_shared_pages_accumulate_and_ignore_garbage():
    q, kc, vc, bt, lens, ind, read = layout(3)
    args = _positional(q, kc, vc, bt, lens, ind, {})
    cot = r(q.shape[0], 4, 2)
    _, dk, dv, *_ = lmspec.vjp("paged_attention", args, {}, cot)
    assert np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))
    assert np.all(dk.reshape(-1, 2, 3)[~read] == 0)
    # the page seq 0 and seq 2 share: its gradient is the sum of both sequences' parts
    rows = np.arange(q.shape[0])
    parts = [lmspec.vjp("paged_attention", args, {}, cot * m[:, None, None])[2]
             for m in (rows < ind[1], rows >= ind[2])]
    np.testing.assert_allclose(dv, parts[0] + parts[1], atol=1e-14)
    shared = int(bt[0, 0])
    assert np.any(parts[0][shared] != 0) and np.any(parts[1][shared] != 0)


def test_merge_attention_states_vjp_and_values():
    o, ls = r(3, 2, 2, 2), r(3, 2, 2)
    ls[1, 0, 0] = -np.inf
    cot = (r(2, 2, 2), r(2, 2))
    grads = lmspec.vjp("merge_attention_states", (o, ls), {}, cot)
    fin = np.where(np.isfinite(ls), ls, -1e3)  # a part at -1e3 contributes exp(-1e3) = 0
    want = finite_difference_vjp("merge_attention_states", (o, fin), {}, cot)
    np.testing.assert_allclose(grads[0], want[0], atol=1e-6)
    np.testing.assert_allclose(grads[1], np.where(np.isfinite(ls), want[1], 0), atol=1e-6)
    out, lse = lmspec.merge_attention_states(o, ls)
    w = np.exp(fin - np.log(np.exp(fin).sum(0)))
    np.testing.assert_allclose(out, (w[..., None] * o).sum(0), atol=1e-14)
    dead = np.full((2, 2, 2), -np.inf)
    out, lse = lmspec.merge_attention_states(r(2, 2, 2, 3) * np.nan, dead)
    assert np.all(out == 0) and np.all(lse == -np.inf)


def test_cascade_equals_whole():
    """Attention over keys = merge of attention over a prefix (no mask) and the rest."""
    q, kc, vc, bt, lens, ind, _ = layout(2)
    whole = lmspec.paged_attention(q, kc, vc, bt, lens, ind, return_lse=True)
    cut = np.minimum(lens - np.diff(ind), 2)  # ≤ S − L: before every query
    pre = lmspec.paged_attention(q, kc, vc, bt, cut, ind, is_causal=False, return_lse=True)
    # the suffix in fresh pages of size 1
    g = kc.shape[2]
    rows_k, rows_v, table = [], [], np.zeros((3, 8), np.int64)
    for b in range(3):
        idx = slots(bt[b], int(lens[b]), 2)[cut[b]:]
        table[b, : len(idx)] = np.arange(len(idx)) + len(rows_k)
        rows_k += list(kc.reshape(-1, g, 3)[idx])
        rows_v += list(vc.reshape(-1, g, 2)[idx])
    suf = lmspec.paged_attention(q, np.array(rows_k)[:, None], np.array(rows_v)[:, None], table,
                                 lens - cut, ind, return_lse=True)
    out, lse = lmspec.merge_attention_states(np.stack([pre[0], suf[0]]),
                                             np.stack([pre[1], suf[1]]))
    np.testing.assert_allclose(out, whole[0], atol=1e-14)
    np.testing.assert_allclose(lse, whole[1], atol=1e-14)


# -- validation ---------------------------------------------------------------------------------

def _ok():
    q, kc, vc, bt, lens, ind, _ = layout(2)
    return [q, kc, vc, bt, lens, ind]


def _bad(i, value):
    a = _ok()
    a[i] = value(a[i]) if callable(value) else value
    return tuple(a)


BAD = [
    (_bad(0, lambda q: q[..., :2]), {}, "k_cache"),
    (_bad(1, lambda k: k[:, :, :1].repeat(3, axis=2)), {}, "k_cache"),
    (_bad(2, lambda v: v[:3]), {}, "v_cache"),
    (_bad(3, lambda t: t.astype(float)), {}, "block_table"),
    (_bad(3, lambda t: np.where(t == t[0, 0], 8, t)), {}, "block_table"),
    (_bad(4, np.array([5, 2, 100])), {}, "kv_lens"),
    (_bad(5, lambda i: i[::-1]), {}, "q_indptr"),
    (_bad(5, np.array([0, 3, 2, 7])), {}, "q_indptr"),
    (_bad(4, np.array([1, 2, 3])), {}, "q_indptr"),  # more queries than keys, causal
    (tuple(_ok()), {"softcap": 0.0}, "softcap"),
    (tuple(_ok()), {"sinks": np.zeros(3)}, "sinks"),
    (tuple(_ok()), {"sinks": np.array([np.inf, 0, 0, 0])}, "sinks"),
    (tuple(_ok()), {"alibi_slopes": np.zeros((2, 4))}, "alibi_slopes"),
    (tuple(_ok()), {"window": (1, -1)}, "window"),
    (tuple(_ok()), {"scale": math.inf}, "scale"),
    (tuple(_ok()), {"return_lse": "yes"}, "return_lse"),
]


@pytest.mark.parametrize("args,kw,arg", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments_raise(args, kw, arg):
    with pytest.raises(ValueError, match=rf"paged_attention: argument '{arg}'"):
        lmspec.paged_attention(*args, **kw)


@pytest.mark.parametrize("args,arg", [
    ((r(2, 3, 2, 1), r(3, 3)), "lses"),
    ((r(2, 3, 2, 1), np.full((2, 3, 2), np.nan)), "lses"),
    ((r(0, 3, 2, 1), r(0, 3, 2)), "outputs"),
])
def test_merge_bad_arguments_raise(args, arg):
    with pytest.raises(ValueError, match=rf"merge_attention_states: argument '{arg}'"):
        lmspec.merge_attention_states(*args)


# -- an independent literal implementation through the harness -----------------------------

class NumpyLiteralServing:
    """The contract's formulas, literally, one query row at a time, in NumPy: float32 and
    float64 in their own precision, float16 and bfloat16 with float32 intermediates and the
    result rounded to the dtype (CONTRACT §6); ``scale`` (also the default ``1/√E``) and
    ``softcap`` held in the working precision."""

    name, device = "numpy-literal-serving", "cpu"
    dtypes = ("float16", "bfloat16", "float32", "float64")

    @staticmethod
    def _work(x: np.ndarray) -> np.dtype:
        return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)

    def paged_attention(self, q, k_cache, v_cache, block_table, kv_lens, q_indptr, scale=None,
                        is_causal=True, window=None, alibi_slopes=None, softcap=None,
                        sinks=None, return_lse=False):
        wt = self._work(q)
        n, h, e = q.shape
        page, g = k_cache.shape[1], k_cache.shape[2]
        sc = wt.type(1 / math.sqrt(e) if scale is None else scale)
        out = np.zeros((n, h, v_cache.shape[-1]), wt)
        lse = np.full((n, h), -np.inf, wt)
        for b in range(len(kv_lens)):
            s_b, lo, hi = int(kv_lens[b]), int(q_indptr[b]), int(q_indptr[b + 1])
            pages = block_table[b, : -(-s_b // page)]
            keys = k_cache[pages].reshape(-1, g, e)[:s_b].astype(wt)
            vals = v_cache[pages].reshape(-1, g, v_cache.shape[-1])[:s_b].astype(wt)
            for i in range(hi - lo):
                pos = s_b - (hi - lo) + i
                t = np.arange(s_b)
                seen = np.ones(s_b, bool)
                if is_causal:
                    seen &= t <= pos
                if window is not None and window[0] is not None:
                    seen &= t - pos >= -window[0]
                if window is not None and window[1] is not None:
                    seen &= t - pos <= window[1]
                for j in range(h):
                    kv = j // (h // g)
                    s = keys[:, kv] @ q[lo + i, j].astype(wt) * sc
                    if softcap is not None:
                        s = wt.type(softcap) * np.tanh(s / wt.type(softcap))
                    if alibi_slopes is not None:
                        sl = alibi_slopes[j] if alibi_slopes.ndim == 1 else alibi_slopes[b, j]
                        s = s - wt.type(sl) * np.abs(pos - t).astype(wt)
                    s = s[seen]
                    terms = s if sinks is None else np.append(s, wt.type(sinks[j]))
                    if not terms.size:
                        continue
                    m = terms.max()
                    w = np.exp(terms - m)
                    out[lo + i, j] = w[: s.size] @ vals[seen, kv] / w.sum()
                    lse[lo + i, j] = m + np.log(w.sum())
        out = out.astype(q.dtype)
        return (out, lse) if return_lse else out

    def merge_attention_states(self, outputs, lses):
        wt = self._work(outputs)
        o, ls = outputs.astype(wt), lses.astype(wt)
        m = ls.max(axis=0)
        m = np.where(np.isfinite(m), m, 0)
        w = np.exp(ls - m)
        tot = w.sum(axis=0)
        live = tot > 0
        lse = np.where(live, m + np.log(np.where(live, tot, 1)), -np.inf)
        out = np.where(live[..., None], (w[..., None] * np.where(
            np.isfinite(ls)[..., None], o, 0)).sum(axis=0) / np.where(live, tot, 1)[..., None],
                       0)
        return out.astype(outputs.dtype), lse.astype(wt)


@pytest.mark.parametrize("dtype", NumpyLiteralServing.dtypes)
@pytest.mark.parametrize("op", SERVING)
def test_literal_numpy_raises_no_alarm(op, dtype):
    """Every check but the vjp, at the default profile (30 examples), passes."""
    backend = NumpyLiteralServing()
    results = run_checks(backend, op, (dtype,), [c for c in checks_of(op) if c != "vjp"],
                         max_examples=30)
    bad = [(x["check"], x["status"], x["message"][:400]) for x in results
           if x["status"] != "pass"]
    assert not bad, bad


# -- the built-in backends through the harness -----------------------------------------------

def _builtin(name: str):
    if name == "torch-cpu":
        from lmspec.backends.torch_backend import TorchBackend

        return TorchBackend("torch-cpu", "cpu", NumpyLiteralServing.dtypes)
    from lmspec.backends.onnxruntime_backend import OrtBackend

    return OrtBackend("onnxruntime-cpu", "cpu", NumpyLiteralServing.dtypes)


@pytest.mark.parametrize("name", ["torch-cpu", "onnxruntime-cpu"])
def test_builtin_backends_conform(name):
    """Every check in all four dtypes, 10 examples each: pass, deviation or unsupported."""
    backend = _builtin(name)
    results = [x for op in SERVING for x in run_checks(
        backend, op, NumpyLiteralServing.dtypes, checks_of(op), max_examples=10)]
    bad = [(x["op"], x["check"], x["dtype"], x["status"], x["message"][:300]) for x in results
           if x["status"] not in ("pass", "deviation", "unsupported")]
    assert not bad, bad


def test_torch_flash_lse_of_a_query_without_keys_is_the_declared_deviation():
    """The CPU flash kernel gives LSE 0 where the spec gives −inf; the deviation covers
    exactly such calls."""
    from lmspec.backends.torch_serving import DEVIATIONS

    q, kc, vc = r(3, 2, 2), r(1, 2, 1, 2), r(1, 2, 1, 2)
    args = (q, kc, vc, np.array([[0]]), np.array([1]), np.array([0, 3]))
    kw = {"is_causal": False, "window": (0, 0), "return_lse": True}
    got = _builtin("torch-cpu").paged_attention(*args, **kw)[1]
    want = lmspec.paged_attention(*args, **kw)[1]
    assert np.all(want[:2] == -np.inf) and np.all(got[:2] == 0)
    np.testing.assert_allclose(got[2], want[2], atol=1e-12)
    dev = DEVIATIONS("cpu")["paged_attention/forward"]
    assert dev.applies(args, kw) and not dev.applies(args, {**kw, "window": None})
