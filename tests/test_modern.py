"""The modern family: reference vjps against float64 finite differences, the reference
against independent oracles (``F.rms_norm``, ``F.scaled_dot_product_attention(enable_gqa=
True)``, ``F.cross_entropy``, and plain NumPy transcriptions of the equations), input
validation, ``sample_token``'s ``min_p``, and torch-cpu through the harness."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("torch")

import torch
import torch.nn.functional as F

import lmspec
from lmspec.backends.torch_backend import TorchBackend
from lmspec.conformance.harness import checks_of
from lmspec.conformance.oracles import finite_difference_vjp

from .conftest import run_checks

RNG = np.random.default_rng(20261129)
MODERN = ("rms_norm", "rotary_embedding", "gated_mlp", "grouped_query_attention",
          "fused_linear_cross_entropy")


def r(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


# -- vjps against finite differences ---------------------------------------------------

def check_vjp(op, args, kwargs=None, atol=1e-6):
    kwargs = kwargs or {}
    out = lmspec.OPS[op].reference(*args, **kwargs)
    cot = r(*np.shape(out))
    grads = lmspec.vjp(op, args, kwargs, cot)
    want = finite_difference_vjp(op, args, kwargs, cot)
    for name, g, w, a in zip(lmspec.OPS[op].params, grads, want, args, strict=False):
        if name not in lmspec.OPS[op].diff or a is None:
            assert g is None
            continue
        np.testing.assert_allclose(g, w, atol=atol, rtol=1e-5, err_msg=f"{op} {name}")


@pytest.mark.parametrize("weight", [None, "drawn"])
def test_rms_norm_vjp(weight):
    check_vjp("rms_norm", (r(2, 3, 5), None if weight is None else r(5)), {"eps": 1e-3})


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 2])
def test_rotary_vjp(interleaved, rotary_dim):
    check_vjp("rotary_embedding", (r(2, 2, 3, 6), np.array([[4, 5, 6], [0, -1, 9]])),
              {"interleaved": interleaved, "rotary_dim": rotary_dim})


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_gated_mlp_vjp(activation):
    check_vjp("gated_mlp", (r(2, 3, 4), r(5, 4), r(5, 4), r(4, 5)), {"activation": activation})


GQA_OPTIONS = [
    {},
    {"is_causal": True, "q_offset": 2},
    {"is_causal": True, "window": (1, 0), "alibi_slopes": np.array([0.5, 0.25, 0.125, 1.0])},
    {"softcap": 2.0, "scale": 1.3, "window": (None, 1), "q_offset": -1},
    {"mask": "drawn", "alibi_slopes": np.abs(r(2, 4)), "softcap": 5.0},
]


def _gqa_args(opts):
    opts = dict(opts)
    mask = RNG.random((2, 1, 3, 5)) < 0.6 if opts.pop("mask", None) else None
    return (r(2, 4, 3, 3), r(2, 2, 5, 3), r(2, 2, 5, 2), mask), opts


@pytest.mark.parametrize("opts", GQA_OPTIONS)
def test_gqa_vjp(opts):
    args, kw = _gqa_args(opts)
    check_vjp("grouped_query_attention", args, kw)


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.2, "z_loss": 0.1},
                                {"softcap": 2.0, "z_loss": 1e-2, "ignore_index": -100}])
@pytest.mark.parametrize("bias", [None, "drawn"])
def test_fused_ce_vjp(kw, bias):
    check_vjp("fused_linear_cross_entropy",
              (r(4, 3), r(5, 3), np.array([0, 1, -100, 4]), None if bias is None else r(5)), kw)


def test_fused_ce_all_ignored_is_nan_with_zero_gradient():
    args = (r(2, 3), r(4, 3), np.array([-100, -100]), r(4))
    assert np.isnan(lmspec.fused_linear_cross_entropy(*args, z_loss=0.1))
    grads = lmspec.vjp("fused_linear_cross_entropy", args, {"z_loss": 0.1}, 1.0)
    assert all(np.all(g == 0) for g in grads if g is not None)


# -- forward against independent oracles ------------------------------------------------

def test_rms_norm_matches_torch():
    x, w = r(3, 4, 7), r(7)
    for weight in (None, w):
        want = F.rms_norm(t(x), (7,), None if weight is None else t(weight), 1e-5).numpy()
        np.testing.assert_allclose(lmspec.rms_norm(x, weight, 1e-5), want, rtol=1e-13)


def _rotary_numpy(x, pos, base, interleaved, rdim):
    """A transcription of Su et al.'s block-diagonal rotation matrix, one pair at a time."""
    e = x.shape[-1]
    rd = rdim or e
    out = x.copy()
    for i in range(rd // 2):
        ia, ib = (2 * i, 2 * i + 1) if interleaved else (i, i + rd // 2)
        theta = base ** (-2 * i / rd)
        ang = np.asarray(pos, dtype=np.float64) * theta
        ang = ang[:, None, :] if ang.ndim == 2 else ang
        c, s = np.cos(ang), np.sin(ang)
        out[..., ia] = x[..., ia] * c - x[..., ib] * s
        out[..., ib] = x[..., ia] * s + x[..., ib] * c
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rdim", [None, 4])
@pytest.mark.parametrize("pos", [np.array([3, 4, 5]), np.array([[0, 1, 2], [7, 100, -2]])])
def test_rotary_matches_numpy(interleaved, rdim, pos):
    x = r(2, 2, 3, 6)
    np.testing.assert_allclose(
        lmspec.rotary_embedding(x, pos, 500.0, interleaved, rdim),
        _rotary_numpy(x, pos, 500.0, interleaved, rdim), rtol=1e-13, atol=1e-13)


def test_rotary_interleaved_matches_complex_multiplication():
    """RoFormer's form: (x_2i + i x_2i+1)·e^{i p θ_i}."""
    x, pos = r(1, 1, 4, 8), np.arange(4) + 10
    z = x[..., 0::2] + 1j * x[..., 1::2]
    theta = 10000.0 ** (-np.arange(4) * 2 / 8)
    zr = z * np.exp(1j * pos[:, None] * theta)
    y = lmspec.rotary_embedding(x, pos, interleaved=True)
    np.testing.assert_allclose(y[..., 0::2], zr.real, atol=1e-13)
    np.testing.assert_allclose(y[..., 1::2], zr.imag, atol=1e-13)


@pytest.mark.parametrize("activation,approx", [("silu", None), ("gelu", "none"),
                                               ("gelu_tanh", "tanh")])
def test_gated_mlp_matches_torch(activation, approx):
    x, wg, wu, wd = r(2, 3, 4), r(5, 4), r(5, 4), r(4, 5)
    a = t(x) @ t(wg).T
    act = F.silu(a) if approx is None else F.gelu(a, approximate=approx)
    want = ((act * (t(x) @ t(wu).T)) @ t(wd).T).numpy()
    np.testing.assert_allclose(lmspec.gated_mlp(x, wg, wu, wd, activation), want, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("g", [1, 2, 4])
def test_gqa_matches_torch_sdpa(causal, g):
    q, k, v = r(2, 4, 3, 5), r(2, g, 3, 5), r(2, g, 3, 2)
    mask = RNG.random((2, 1, 3, 3)) < 0.7
    want = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=t(mask).bool() if not
                                          causal else None, is_causal=causal,
                                          enable_gqa=True).numpy()
    got = lmspec.grouped_query_attention(q, k, v, None if causal else mask, is_causal=causal)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def _gqa_numpy(q, k, v, mask, is_causal, scale, q_offset, window, slopes, softcap):
    """Loops over batch, head, query and key: the contract's sentences one by one."""
    b, h, n_q, e = q.shape
    g, n_k = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(e) if scale is None else scale
    out = np.zeros((b, h, n_q, v.shape[-1]))
    full = np.ones((b, h, n_q, n_k), bool) if mask is None else np.broadcast_to(
        mask, (b, h, n_q, n_k))
    for bi in range(b):
        for j in range(h):
            kv = j // (h // g)
            for i in range(n_q):
                pos = q_offset + i
                s, vis = [], []
                for kj in range(n_k):
                    sc = scale * float(q[bi, j, i] @ k[bi, kv, kj])
                    if softcap is not None:
                        sc = softcap * math.tanh(sc / softcap)
                    if slopes is not None:
                        sl = slopes[j] if slopes.ndim == 1 else slopes[bi, j]
                        sc -= sl * abs(pos - kj)
                    ok = bool(full[bi, j, i, kj]) and (not is_causal or kj <= pos)
                    if window is not None:
                        left, right = window
                        ok &= (left is None or kj - pos >= -left) and (
                            right is None or kj - pos <= right)
                    s.append(sc)
                    vis.append(ok)
                if any(vis):
                    m = max(sc for sc, ok in zip(s, vis) if ok)
                    w = np.array([math.exp(sc - m) if ok else 0.0 for sc, ok in zip(s, vis)])
                    out[bi, j, i] = (w / w.sum()) @ v[bi, kv]
    return out


@pytest.mark.parametrize("opts", GQA_OPTIONS + [
    {"is_causal": True, "q_offset": 9}, {"window": (0, 0)}, {"is_causal": True, "q_offset": -5},
    {"window": (2, None), "is_causal": True, "q_offset": 2, "mask": "drawn"}])
def test_gqa_matches_numpy_loops(opts):
    args, kw = _gqa_args(opts)
    want = _gqa_numpy(*args, kw.get("is_causal", False), kw.get("scale"), kw.get("q_offset", 0),
                      kw.get("window"), kw.get("alibi_slopes"), kw.get("softcap"))
    got = lmspec.grouped_query_attention(*args, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.3, "ignore_index": 2},
                                {"softcap": 3.0}])
def test_fused_ce_matches_torch(kw):
    h, w, b, y = r(5, 3), r(6, 3), r(6), np.array([0, 2, 5, 2, 1])
    z = t(h) @ t(w).T + t(b)
    if "softcap" in kw:
        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
    want = F.cross_entropy(z, torch.from_numpy(y), ignore_index=kw.get("ignore_index", -100),
                           label_smoothing=kw.get("label_smoothing", 0.0)).item()
    assert lmspec.fused_linear_cross_entropy(h, w, y, b, **kw) == pytest.approx(want, rel=1e-13)


def test_fused_ce_z_loss_numpy():
    h, w, y = r(4, 3), r(5, 3), np.array([0, -100, 4, 1])
    z = h @ w.T
    lse = np.log(np.exp(z).sum(axis=1))
    keep = y != -100
    want = np.mean((lse - z[np.arange(4), np.where(keep, y, 0)] + 0.5 * lse**2)[keep])
    assert lmspec.fused_linear_cross_entropy(h, w, y, z_loss=0.5) == pytest.approx(want,
                                                                                   rel=1e-13)


# -- sample_token's min_p -----------------------------------------------------------------

def test_min_p_keeps_tokens_above_threshold():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    # min_p = 0.5: keep p ≥ 0.25 -> {0, 1}, renormalised 0.625 / 0.375
    assert lmspec.sample_token(logits, np.array([0.6]), min_p=0.5).tolist() == [0]
    assert lmspec.sample_token(logits, np.array([0.63]), min_p=0.5).tolist() == [1]
    assert lmspec.sample_token(logits, np.array([0.99]), min_p=0.5).tolist() == [1]
    assert lmspec.sample_token(logits, np.array([0.99]), min_p=0.0).tolist() == [3]
    assert lmspec.sample_token(logits, np.array([0.99]), min_p=1.0).tolist() == [0]


def test_min_p_after_top_p():
    """The threshold compares with the largest probability after top-p's renormalisation,
    which min_p is invariant to: top_p = 0.8 keeps {0, 1} (0.625/0.375) and min_p = 0.7
    keeps 0.375 < 0.4375 out."""
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert lmspec.sample_token(logits, np.array([0.9]), top_p=0.8, min_p=0.7).tolist() == [0]
    assert lmspec.sample_token(logits, np.array([0.9]), top_p=0.8, min_p=0.5).tolist() == [1]


# -- validation -----------------------------------------------------------------------------

BAD = [
    ("rms_norm", (r(2, 3), r(4)), {}, "weight"),
    ("rms_norm", (r(2, 3), None), {"eps": -1.0}, "eps"),
    ("rotary_embedding", (r(1, 1, 2, 5), np.arange(2)), {}, "x"),
    ("rotary_embedding", (r(1, 1, 2, 6), np.arange(2)), {"rotary_dim": 3}, "rotary_dim"),
    ("rotary_embedding", (r(1, 1, 2, 6), np.arange(2)), {"rotary_dim": 8}, "rotary_dim"),
    ("rotary_embedding", (r(1, 1, 2, 6), np.arange(2.0)), {}, "positions"),
    ("rotary_embedding", (r(1, 1, 2, 6), np.arange(3)), {}, "positions"),
    ("gated_mlp", (r(2, 3), r(4, 3), r(4, 3), r(3, 4)), {"activation": "relu"}, "activation"),
    ("gated_mlp", (r(2, 3), r(4, 3), r(5, 3), r(3, 4)), {}, "W_up"),
    ("grouped_query_attention", (r(1, 3, 2, 4), r(1, 2, 2, 4), r(1, 2, 2, 4)), {}, "k"),
    ("grouped_query_attention", (r(1, 2, 2, 4), r(1, 1, 2, 4), r(1, 1, 2, 4)),
     {"window": (-1, 0)}, "window"),
    ("grouped_query_attention", (r(1, 2, 2, 4), r(1, 1, 2, 4), r(1, 1, 2, 4)),
     {"window": 3}, "window"),
    ("grouped_query_attention", (r(1, 2, 2, 4), r(1, 1, 2, 4), r(1, 1, 2, 4)),
     {"softcap": 0.0}, "softcap"),
    ("grouped_query_attention", (r(1, 2, 2, 4), r(1, 1, 2, 4), r(1, 1, 2, 4)),
     {"alibi_slopes": r(3)}, "alibi_slopes"),
    ("grouped_query_attention", (r(1, 2, 2, 4), r(1, 1, 2, 4), r(1, 1, 2, 4)),
     {"q_offset": 1.5}, "q_offset"),
    ("fused_linear_cross_entropy", (r(2, 3), r(4, 3), np.array([0, 4])), {}, "targets"),
    ("fused_linear_cross_entropy", (r(2, 3), r(4, 3), np.array([0, 1])), {"z_loss": -0.1},
     "z_loss"),
    ("sample_token", (r(1, 3), np.array([0.5])), {"min_p": 1.5}, "min_p"),
]


@pytest.mark.parametrize("op,args,kw,arg", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in
                                                     enumerate(BAD)])
def test_bad_arguments_raise(op, args, kw, arg):
    with pytest.raises(ValueError, match=rf"{op}: argument '{arg}'"):
        lmspec.OPS[op].reference(*args, **kw)


# -- torch-cpu through the harness -----------------------------------------------------------

@pytest.mark.parametrize("op", [*MODERN, "sample_token"])
def test_torch_cpu_conforms(op):
    """Every check in all four dtypes, a few examples each (the full default profile is
    measured by ``lmspec run --op``; its outcome is in the backend's DEVIATIONS)."""
    dtypes = ("float16", "bfloat16", "float32", "float64")
    backend = TorchBackend("torch-cpu", "cpu", dtypes)
    results = run_checks(backend, op, dtypes, checks_of(op), max_examples=10)
    bad = [(x["check"], x["dtype"], x["status"], x["message"]) for x in results
           if x["status"] not in ("pass", "deviation")]
    assert not bad, bad
