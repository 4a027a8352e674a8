"""Rounding in the wrong place: half-precision mutants, and the mixed-precision kernels
they are mutants of (CONTRACT §6, 2026-12-06).

In float16 and bfloat16 a conforming kernel stores inputs and outputs in the dtype and
computes every intermediate in at least float32: reductions, softmax and normalisation
statistics, rotary angles and their cos/sin, loss accumulations. Each mutant below is a
mixed-precision kernel (half in, float32 compute, half out) with one intermediate rounded
to the input's half dtype, the way production kernels get it wrong:

- rotary angles ``p·θ_i`` and their cos/sin formed in the input dtype (the long-context
  RoPE bug: bfloat16's spacing at position 1000 is 8, float16 overflows past 65504);
- a half accumulator for the statistics of softmax, logsumexp, layer norm and RMS norm,
  attention's softmax (SDPA and GQA) and the cross-entropy's log-sum-exp and mean: every
  partial sum rounded to the dtype (:func:`half_sum`);
- the residual ``x + block(x)`` rounded to bfloat16 before the layer norm of a post- or
  pre-norm encoder layer;
- the cross-entropy gradient ``softmax(z) − onehot(y)`` with the softmax rounded to the
  dtype first: at ``p[y] ≈ 1`` bfloat16 rounds ``p[y]`` to 1 and the gradient of the true
  class to 0.

Each mutant must fail at the default profile (30 fresh examples per check) in every half
dtype it targets, on every seed; each correct kernel must pass everywhere. They run
through the real harness as in-process backends (torch-cpu with the op replaced), like
the other ``test_mutants_*`` files; the kernels are written here from the contract alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from lmspec.modern import _check_gqa, gqa_scores  # noqa: E402
from tests.conftest import MutantBackend, run_checks  # noqa: E402

HALF = ("float16", "bfloat16")
SEEDS = [0, *(pytest.param(s, marks=pytest.mark.slow) for s in range(1, 5))]
"""Seed 0 always; seeds 1-4 with ``-m slow`` (the acceptance run: every seed)."""


# -- building blocks -----------------------------------------------------------------------


def half_sum(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``Σ_i x_i`` along ``dim`` with every partial sum rounded to ``dtype`` (a sequential
    half-precision accumulator: ``s ← fl(s + x_i)``), returned in ``dtype``."""
    x = torch.movedim(x.to(dtype), dim, -1)
    acc = torch.zeros(x.shape[:-1], dtype=dtype)
    for i in range(x.shape[-1]):
        acc = acc + x[..., i]
    return acc.unsqueeze(-1).movedim(-1, dim).squeeze(dim)


# -- softmax, log_softmax, logsumexp --------------------------------------------------------


def _exp_shifted(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``exp(x − m)`` in float32, ``m = max x`` (0 where not finite)."""
    x = x.float()
    m = x.amax(axis, keepdim=True)
    return torch.exp(x - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))


def softmax_kernel(x: torch.Tensor, axis: int = -1, *, half_stats: bool = False) -> torch.Tensor:
    """``e / Σ e`` with ``e = exp(x − max x)`` in float32; the sum in float32, or with
    ``half_stats`` in a half accumulator. A one-element axis is 1 (CONTRACT §6)."""
    if x.shape[axis] == 1:
        return torch.where(torch.isnan(x), x, torch.ones_like(x))
    e = _exp_shifted(x, axis)
    total = (half_sum(e, axis, x.dtype).float().unsqueeze(axis) if half_stats
             else e.sum(axis, keepdim=True))
    return (e / total).to(x.dtype)


def logsumexp_kernel(x: torch.Tensor, axis: int = -1, *,
                     half_stats: bool = False) -> torch.Tensor:
    """``m + ln Σ exp(x − m)``, the sum in float32 or (``half_stats``) a half accumulator
    and the result formed in the dtype; a one-element axis is the value itself."""
    if x.shape[axis] == 1:
        return x.squeeze(axis)
    xf = x.float()
    m = xf.amax(axis, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(xf - m)
    if half_stats:
        return m.squeeze(axis).to(x.dtype) + torch.log(half_sum(e, axis, x.dtype))
    return (m.squeeze(axis) + torch.log(e.sum(axis))).to(x.dtype)


def softmax_half_sum(x, axis=-1):
    return softmax_kernel(x, axis, half_stats=True)


def logsumexp_half_sum(x, axis=-1):
    return logsumexp_kernel(x, axis, half_stats=True)


# -- layer_norm, rms_norm ----------------------------------------------------------------


def layer_norm_kernel(x, gamma, beta, eps=1e-5, *, half_stats: bool = False):
    """``(x − μ)/√(σ² + ε)·γ + β`` in float32; with ``half_stats`` the mean and variance
    accumulate in the input dtype."""
    xf, d = x.float(), x.shape[-1]
    if half_stats:
        mu = (half_sum(xf, -1, x.dtype) / d).float().unsqueeze(-1)
        var = (half_sum((xf - mu) ** 2, -1, x.dtype) / d).float().unsqueeze(-1)
    else:
        mu = xf.mean(-1, keepdim=True)
        var = ((xf - mu) ** 2).mean(-1, keepdim=True)
    return ((xf - mu) / torch.sqrt(var + eps) * gamma.float() + beta.float()).to(x.dtype)


def layer_norm_half_stats(x, gamma, beta, eps=1e-5):
    return layer_norm_kernel(x, gamma, beta, eps, half_stats=True)


def rms_norm_kernel(x, weight=None, eps=1e-6, *, half_stats: bool = False):
    """``x/√(mean x² + ε)·w`` in float32; with ``half_stats`` the squares and their sum
    in the input dtype."""
    xf, d = x.float(), x.shape[-1]
    if half_stats:
        ms = (half_sum((x * x).float(), -1, x.dtype) / d).float().unsqueeze(-1)
    else:
        ms = (xf * xf).mean(-1, keepdim=True)
    y = xf * torch.rsqrt(ms + eps)
    return (y if weight is None else y * weight.float()).to(x.dtype)


def rms_norm_half_stats(x, weight=None, eps=1e-6):
    return rms_norm_kernel(x, weight, eps, half_stats=True)


# -- rotary_embedding ----------------------------------------------------------------------


def rotary_kernel(x, positions, base=10000.0, interleaved=False, rotary_dim=None, *,
                  angle_dtype: torch.dtype = torch.float32):
    """Pairs ``(a, b) → (a cos − b sin, a sin + b cos)`` with the angles ``p·θ_i``,
    ``θ_i = base^(−2i/r)``, and their cos/sin formed in ``angle_dtype`` (float32; the bug:
    the input dtype), the rotation itself in float32."""
    r = rotary_dim or x.shape[-1]
    theta = base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    pos = positions.to(angle_dtype)
    angle = pos[..., None] * theta.to(angle_dtype)  # [T, r/2] or [B, T, r/2]
    if angle.ndim == 3:
        angle = angle[:, None]  # [B, 1, T, r/2]
    cos, sin = torch.cos(angle).float(), torch.sin(angle).float()
    xf = x.float()
    if interleaved:
        a, b = xf[..., 0:r:2], xf[..., 1:r:2]
        rot = torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)
    else:
        a, b = xf[..., : r // 2], xf[..., r // 2: r]
        rot = torch.cat((a * cos - b * sin, a * sin + b * cos), -1)
    return torch.cat((rot, xf[..., r:]), -1).to(x.dtype)


def rotary_half_angles(x, positions, base=10000.0, interleaved=False, rotary_dim=None):
    return rotary_kernel(x, positions, base, interleaved, rotary_dim, angle_dtype=x.dtype)


# -- attention (SDPA, GQA): NumPy, forward only ---------------------------------------------


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().float().numpy().astype(np.float64)


def _np_dtype(t: torch.dtype) -> np.dtype:
    return np.dtype(np.float16) if t == torch.float16 else np.dtype(ml_dtypes.bfloat16)


def attention_kernel(q, k, v, mask=None, is_causal=False, scale=None, q_offset=0, window=None,
                     alibi_slopes=None, softcap=None, *, half_stats: bool = False):
    """Grouped-query attention (SDPA is ``g = h``, ``q_offset = 0``): the scores (the spec's
    own, rounded to float32), masked, ``p = exp(s − m)/Σ`` in float32 with the sum in
    float32 or (``half_stats``) a half accumulator, a row with no visible key 0, ``P V``
    in float32; the output rounded to the input dtype."""
    dt = q.dtype
    mask_np = None if mask is None else mask.numpy()
    qq, kk, vv, allow, s, rel, slopes, cap = _check_gqa(
        _np(q), _np(k), _np(v), mask_np, is_causal, scale, q_offset, window,
        _np(alibi_slopes), softcap)
    b, h, n_q, _ = qq.shape
    g, n_k = kk.shape[1], kk.shape[2]
    scores, _ = gqa_scores(qq, kk, s, rel, slopes, cap)
    e = scores.reshape(b, h, n_q, n_k).astype(np.float32)
    if allow is not None:
        e = np.where(allow, e, -np.inf).astype(np.float32)
    m = np.max(e, axis=-1, keepdims=True)
    e = np.exp(e - np.where(np.isfinite(m), m, 0)).astype(np.float32)
    if half_stats:
        acc = np.zeros(e.shape[:-1], _np_dtype(dt))
        for j in range(n_k):
            acc = (acc + e[..., j].astype(acc.dtype)).astype(acc.dtype)
        total = acc.astype(np.float32)[..., None]
    else:
        total = e.sum(-1, keepdims=True, dtype=np.float32)
    p = np.where(total > 0, e / np.where(total > 0, total, 1), 0).astype(np.float32)
    out = (p.reshape(b, g, (h // g) * n_q, n_k) @ vv.astype(np.float32)).reshape(b, h, n_q, -1)
    return torch.from_numpy(out.astype(np.float32)).to(dt)


def sdpa_kernel(q, k, v, mask=None, is_causal=False, scale=None, *, half_stats=False):
    return attention_kernel(q, k, v, mask, is_causal, scale, half_stats=half_stats)


def sdpa_half_softmax(q, k, v, mask=None, is_causal=False, scale=None):
    return sdpa_kernel(q, k, v, mask, is_causal, scale, half_stats=True)


def gqa_half_softmax(q, k, v, mask=None, is_causal=False, scale=None, q_offset=0, window=None,
                     alibi_slopes=None, softcap=None):
    return attention_kernel(q, k, v, mask, is_causal, scale, q_offset, window, alibi_slopes,
                            softcap, half_stats=True)


# -- cross_entropy -------------------------------------------------------------------------


def cross_entropy_kernel(logits, targets, ignore_index=-100, label_smoothing=0.0, *,
                         half_stats: bool = False):
    """``mean_{kept rows} [(1−ε)(lse − z_y) + ε(lse − mean_c z_c)]`` with ``lse`` from
    float32 statistics; with ``half_stats`` the log-sum-exp is accumulated and formed in the
    input dtype (:func:`logsumexp_kernel`) and the row losses are summed in a half
    accumulator. NaN when every row is ignored."""
    dt = logits.dtype
    keep = targets != ignore_index
    z = logits.float()
    lse = logsumexp_kernel(logits, -1, half_stats=half_stats).float() if half_stats else (
        torch.logsumexp(z, -1) if z.shape[-1] > 1 else z[:, 0])
    picked = z.gather(1, torch.where(keep, targets, 0)[:, None])[:, 0]
    row = (1 - label_smoothing) * (lse - picked) + label_smoothing * (lse - z.mean(-1))
    row = torch.where(keep, row, torch.zeros_like(row))
    total = half_sum(row, 0, dt).float() if half_stats else row.sum()
    return (total / keep.sum()).to(dt)


def cross_entropy_half_sum(logits, targets, ignore_index=-100, label_smoothing=0.0):
    return cross_entropy_kernel(logits, targets, ignore_index, label_smoothing, half_stats=True)


class _GradientFromHalfSoftmax(torch.autograd.Function):
    """The loss of :func:`cross_entropy_kernel`; its gradient ``c·(p − (1−ε)·onehot −
    ε/V)/|R|`` with ``p = softmax(z)`` rounded to the input dtype before the subtraction."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, label_smoothing):
        ctx.save_for_backward(logits, targets)
        ctx.rest = (ignore_index, label_smoothing)
        return cross_entropy_kernel(logits, targets, ignore_index, label_smoothing)

    @staticmethod
    def backward(ctx, cot):
        logits, targets = ctx.saved_tensors
        ignore_index, eps = ctx.rest
        keep = targets != ignore_index
        p = torch.softmax(logits.float(), -1).to(logits.dtype).float()  # the bug
        onehot = F.one_hot(torch.where(keep, targets, 0), logits.shape[1]).float()
        g = (p - (1 - eps) * onehot - eps / logits.shape[1]) * keep[:, None]
        g = cot.float() * g / keep.sum().clamp(min=1)
        return g.to(logits.dtype), None, None, None


def cross_entropy_gradient_half_softmax(logits, targets, ignore_index=-100,
                                        label_smoothing=0.0):
    return _GradientFromHalfSoftmax.apply(logits, targets, ignore_index, label_smoothing)


# -- transformer_encoder_layer ---------------------------------------------------------------


def _mha(x, W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o, heads, key_valid, is_causal):
    """Self-attention in float32: per-head softmax over the visible keys (zeros for none)."""
    bsz, t, dm = x.shape
    dh = dm // heads

    def split(y):
        return y.reshape(bsz, t, heads, dh).transpose(1, 2)

    q, k, v = (split(x @ W.T + b) for W, b in ((W_q, b_q), (W_k, b_k), (W_v, b_v)))
    s = q @ k.transpose(-1, -2) / math.sqrt(dh)
    allow = torch.ones(t, t, dtype=torch.bool)
    if is_causal:
        allow = torch.tril(allow)
    allow = allow[None, None]
    if key_valid is not None:
        allow = allow & key_valid[:, None, None, :]
    s = torch.where(allow, s, torch.full_like(s, -math.inf))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    total = e.sum(-1, keepdim=True)
    p = e / torch.where(total > 0, total, torch.ones_like(total))
    return (p @ v).transpose(1, 2).reshape(bsz, t, dm) @ W_o.T + b_o


def encoder_kernel(x, weights, num_heads, key_valid=None, is_causal=False, norm_first=False,
                   activation="relu", eps=1e-5, *, residual_dtype: torch.dtype | None = None):
    """The encoder layer of CONTRACT §2 in float32 (post-norm ``LN(x + block(x))``, pre-norm
    ``x + block(LN(x))``); with ``residual_dtype`` every residual sum is rounded to it
    before it goes on (the bug: a bfloat16 residual stream)."""
    dt = x.dtype
    attn, ffn, n1, n2 = (tuple(a.float() for a in weights[i:j]) for i, j in
                         ((0, 8), (8, 12), (12, 14), (14, 16)))

    def residual(a, b):
        s = a + b
        return s if residual_dtype is None else s.to(residual_dtype).float()

    def ln(y, gb):
        return F.layer_norm(y, (y.shape[-1],), gb[0], gb[1], eps)

    def feed(y):
        h = y @ ffn[0].T + ffn[1]
        h = F.relu(h) if activation == "relu" else F.gelu(h)
        return h @ ffn[2].T + ffn[3]

    def sa(y):
        return _mha(y, *attn, num_heads, key_valid, is_causal)

    y = x.float()
    if norm_first:
        y = residual(y, sa(ln(y, n1)))
        y = residual(y, feed(ln(y, n2)))
    else:
        y = ln(residual(y, sa(y)), n1)
        y = ln(residual(y, feed(y)), n2)
    return y.to(dt)


def encoder_bf16_residual(x, weights, num_heads, key_valid=None, is_causal=False,
                          norm_first=False, activation="relu", eps=1e-5):
    return encoder_kernel(x, weights, num_heads, key_valid, is_causal, norm_first, activation,
                          eps, residual_dtype=torch.bfloat16)


# -- the cases -----------------------------------------------------------------------------

Case = tuple[str, Callable[..., Any], tuple[str, ...], tuple[str, ...]]
"""(op, kernel, half dtypes, checks)."""

MUTANTS: dict[str, Case] = {
    "rope: angles and cos/sin in the input dtype": (
        "rotary_embedding", rotary_half_angles, HALF, ("forward",)),
    "softmax: half accumulator": ("softmax", softmax_half_sum, HALF, ("forward", "vjp")),
    "logsumexp: half accumulator": ("logsumexp", logsumexp_half_sum, HALF, ("forward", "vjp")),
    "layer_norm: half statistics": ("layer_norm", layer_norm_half_stats, HALF,
                                    ("forward", "vjp")),
    "rms_norm: half statistics": ("rms_norm", rms_norm_half_stats, HALF, ("forward", "vjp")),
    "sdpa: half accumulator in the softmax": ("scaled_dot_product_attention",
                                              sdpa_half_softmax, HALF, ("forward",)),
    "gqa: half accumulator in the softmax": ("grouped_query_attention", gqa_half_softmax, HALF,
                                             ("forward",)),
    "cross_entropy: half log-sum-exp and mean": ("cross_entropy", cross_entropy_half_sum, HALF,
                                                 ("forward",)),
    "cross_entropy: gradient from a bf16 softmax": ("cross_entropy",
                                                    cross_entropy_gradient_half_softmax,
                                                    ("bfloat16",), ("vjp",)),
    "encoder: residual rounded to bf16 before the norm": (
        "transformer_encoder_layer", encoder_bf16_residual, HALF, ("forward",)),
}

CORRECT: dict[str, Case] = {
    "rope": ("rotary_embedding", rotary_kernel, HALF, ("forward", "vjp")),
    "softmax": ("softmax", softmax_kernel, HALF, ("forward", "vjp")),
    "logsumexp": ("logsumexp", logsumexp_kernel, HALF, ("forward", "vjp")),
    "layer_norm": ("layer_norm", layer_norm_kernel, HALF, ("forward", "vjp")),
    "rms_norm": ("rms_norm", rms_norm_kernel, HALF, ("forward", "vjp")),
    "sdpa": ("scaled_dot_product_attention", sdpa_kernel, HALF, ("forward",)),
    "gqa": ("grouped_query_attention", attention_kernel, HALF, ("forward",)),
    "cross_entropy": ("cross_entropy", cross_entropy_kernel, HALF, ("forward", "vjp")),
    "encoder": ("transformer_encoder_layer", encoder_kernel, HALF, ("forward",)),
}


class HalfBackend(MutantBackend):
    """torch-cpu in all four dtypes with one op replaced; no declared deviations."""

    def __init__(self, overrides: dict[str, Callable[..., Any]]):
        super().__init__(overrides, name="half-mutant")
        self.dtypes = ("float16", "bfloat16", "float32", "float64")


def _results(case: Case, seed: int) -> list[dict[str, Any]]:
    op, kernel, dtypes, checks = case
    return run_checks(HalfBackend({op: kernel}), op, dtypes, checks, max_examples=30, seed=seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(MUTANTS))
def test_half_mutant_is_caught(name, seed):
    """In every half dtype it targets, some check fails at 30 examples."""
    results = _results(MUTANTS[name], seed)
    for dtype in MUTANTS[name][2]:
        mine = [r for r in results if r["dtype"] == dtype]
        assert any(r["status"] == "fail" for r in mine), (
            f"{name} went unnoticed in {dtype} (seed {seed}): "
            f"{[(r['check'], r['status'], r['worst_ratio']) for r in mine]}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(CORRECT))
def test_mixed_precision_kernel_conforms(name, seed):
    """Half in, float32 compute, half out: conforming by the contract, never a failure."""
    results = _results(CORRECT[name], seed)
    bad = [(r["dtype"], r["check"], r["status"], r["message"], r["counterexample"])
           for r in results if r["status"] != "pass"]
    assert not bad, bad
