"""Modern family on torch's own kernels.

``F.rms_norm``; ``F.scaled_dot_product_attention(..., enable_gqa=True)`` with one additive
float mask that carries the causal/offset/window/mask visibility (``−inf``) and the ALiBi
bias; ``F.silu`` / ``F.gelu(approximate=...)`` with ``F.linear``; ``F.linear`` +
``F.cross_entropy`` (+ ``torch.logsumexp`` for the z-loss). Where torch has no kernel
(rotary embedding, score soft-capping) the op is composed from torch ops and
:data:`NOTES` says so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmspec import Deviation
from lmspec.backends.torch_attention import AT_100, flash_causal_nan, half_intermediates

NOTES = {
    "rms_norm": "F.rms_norm.",
    "rotary_embedding": "torch has no rotary kernel: composed from torch ops as Hugging Face "
    "transformers and GPT-NeoX do it. The angles positions·θ and their cos/sin are computed in "
    "float32 for float16/bfloat16 inputs (float64 for float64) and cast to the input dtype; "
    "the rotation runs in the input dtype (rotate-half by slicing and torch.cat, interleaved "
    "by strided slicing and torch.stack).",
    "gated_mlp": "F.linear, F.silu / F.gelu(approximate='none' | 'tanh'), F.linear.",
    "grouped_query_attention": "F.scaled_dot_product_attention(enable_gqa=True, scale=...) "
    "with one additive float attn_mask [B,h,L,S] in the input dtype: −inf where a key is not "
    "visible (mask, causal at q_offset, window), −slope·|q_offset + i − j| elsewhere (ALiBi); "
    "a query with no visible key gets zeros from SDPA itself. softcap has no SDPA form (it is "
    "a nonlinearity of the scores); torch's kernel for it is flex_attention(score_mod=...), "
    "whose backward raises NotImplementedError on the CPU in torch 2.13 and whose forward "
    "there is an unfused eager fallback, so with softcap the op is composed from torch.matmul "
    "(key/value heads expanded with repeat_interleave), torch.tanh and torch.softmax (a query "
    "with no visible key is given zeros by multiplying by the mask).",
    "fused_linear_cross_entropy": "torch has no fused linear-cross-entropy kernel: F.linear, "
    "softcap·torch.tanh(z/softcap), F.cross_entropy(ignore_index, label_smoothing) and, for "
    "z_loss > 0, the mean over the kept rows of z_loss·lse², lse = torch.logsumexp, summed as "
    "lse·(z_loss·lse/n) so that no float16 summand exceeds the result "
    "(Liger-Kernel and Apple's cut-cross-entropy fuse these on CUDA; they are not torch).",
}

_EVERYWHERE = {
    "grouped_query_attention/equals_sdpa_when_g_is_h": Deviation(
        "The comparator of this property is the backend's scaled_dot_product_attention, "
        "i.e. torch's own F.scaled_dot_product_attention, which returns NaN rows on the CPU "
        "with is_causal=True and a scale ≤ 0 (E == Ev, S ≥ 2, no mask; the deviation of "
        "scaled_dot_product_attention): q = k = v = 0 of shape [1,1,1,1] / [1,1,2,1] gives "
        "NaN where the spec gives 0. grouped_query_attention itself passes its visibility "
        "as an explicit additive mask (torch's SDPA has no q_offset or window) and "
        "conforms; only this property, through SDPA, sees it.",
        applies=flash_causal_nan("grouped_query_attention")),
}


def DEVIATIONS(device: str) -> dict[str, Deviation]:  # noqa: N802 - the backend's hook
    """Known differences of torch's kernels from the spec on ``device`` (measured)."""
    if device != "cpu":
        return dict(_EVERYWHERE)
    return {**_EVERYWHERE, **_CPU_HALF}


_CPU_HALF = half_intermediates(
    "fused_linear_cross_entropy/forward/{dtype}",
    "F.linear's logits and F.cross_entropy's log-probabilities are tensors of the input "
    "dtype (rounded to it) before the pick and the mean. In float16 this bound replaces the "
    "predicate of F.cross_entropy's smoothing overflow (label_smoothing > 0 over a large "
    "vocabulary: inf where the spec gives 16.70, V = 32001, ε = 0.1, found by --shapes "
    "large), whose examples are judged at this bound.",
    {"float16": 2.13, "bfloat16": 2.81}) | half_intermediates(
    "fused_linear_cross_entropy/vjp/{dtype}",
    "the backward of F.cross_entropy and F.linear runs in the input dtype (the gradient of "
    "the logits is a tensor of that dtype).",
    {"float16": 182, "bfloat16": 8.88}) | half_intermediates(
    "gated_mlp/*/{dtype}",
    "F.linear's outputs (gate and up projections) and the activation's output are tensors of "
    "the input dtype (rounded to it) before the product and the down projection.",
    {"float16": 3.30, "bfloat16": 7.40}) | half_intermediates(
    "grouped_query_attention/vjp/{dtype}",
    "F.scaled_dot_product_attention's CPU backward for half tensors holds the probabilities "
    "and the gradients of the scores in the input dtype.",
    {"float16": 10.4, "bfloat16": 6.37}) | half_intermediates(
    "grouped_query_attention/forward/{dtype}",
    "F.scaled_dot_product_attention's CPU kernel for float16 rounds the scores or the "
    "weights to float16 between its matmuls.", {"float16": 3.18}) | half_intermediates(
    "grouped_query_attention/forward/{dtype}",
    "F.scaled_dot_product_attention's CPU kernel for bfloat16 rounds the scores or the "
    "weights to bfloat16 between its matmuls.", {"bfloat16": 32.0}, AT_100, "0.315",
) | half_intermediates(
    "rotary_embedding/vjp/{dtype}",
    "composed as Hugging Face transformers does it, the rotation a·cos − b·sin runs in the "
    "input dtype (each product rounded to it), and so does its backward.",
    {"bfloat16": 1.16})


# -- rms_norm ----------------------------------------------------------------------------

def rms_norm(x, weight=None, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


# -- rotary_embedding --------------------------------------------------------------------

def _angles(positions, half: int, r: int, base: float, dtype: torch.dtype):
    """``cos, sin`` of ``positions·θ_i`` in float32 (float64 for float64), cast to
    ``dtype``; shaped to broadcast over ``[B, h, T, r/2]``."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, r, 2, dtype=work, device=positions.device) / r)
    angle = positions.to(work)[..., None] * inv_freq
    if angle.dim() == 3:  # [B, T, r/2] -> [B, 1, T, r/2]
        angle = angle[:, None]
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


def rotary_embedding(x, positions, base=10000.0, interleaved=False, rotary_dim=None):
    r = rotary_dim or x.shape[-1]
    half = r // 2
    cos, sin = _angles(positions, half, r, base, x.dtype)
    rot, rest = x[..., :r], x[..., r:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        turned = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    else:
        a, b = rot[..., :half], rot[..., half:]
        turned = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return torch.cat([turned, rest], dim=-1)


# -- gated_mlp ---------------------------------------------------------------------------

_ACT = {"silu": F.silu, "gelu": lambda a: F.gelu(a, approximate="none"),
        "gelu_tanh": lambda a: F.gelu(a, approximate="tanh")}


def gated_mlp(x, W_gate, W_up, W_down, activation="silu"):
    return F.linear(_ACT[activation](F.linear(x, W_gate)) * F.linear(x, W_up), W_down)


# -- grouped_query_attention -------------------------------------------------------------

def _visible(n_q: int, n_k: int, is_causal: bool, q_offset: int, window, dev) -> torch.Tensor:
    """``[L, S]`` visibility from causality at ``q_offset`` and the window, and the signed
    distance ``j − (q_offset + i)``."""
    rel = (torch.arange(n_k, device=dev)[None, :]
           - (q_offset + torch.arange(n_q, device=dev))[:, None])
    allow = torch.ones(n_q, n_k, dtype=torch.bool, device=dev)
    if is_causal:
        allow &= rel <= 0
    if window is not None:
        left, right = window
        if left is not None:
            allow &= rel >= -left
        if right is not None:
            allow &= rel <= right
    return allow, rel


def _as_4d(m):
    return m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))


def grouped_query_attention(q, k, v, mask=None, is_causal=False, scale=None, q_offset=0,
                            window=None, alibi_slopes=None, softcap=None):
    b, h, n_q, e = q.shape
    n_k = k.shape[2]
    allow, rel = _visible(n_q, n_k, is_causal, q_offset, window, q.device)
    allow = allow.expand(b, h, n_q, n_k)
    if mask is not None:
        allow = allow & _as_4d(mask)
    bias = torch.zeros((), dtype=q.dtype, device=q.device)
    if alibi_slopes is not None:
        slopes = alibi_slopes.reshape(-1 if alibi_slopes.dim() == 1 else b, h)
        slopes = slopes.reshape(slopes.shape[0], h, 1, 1)
        bias = -slopes * rel.abs().to(q.dtype)
    if softcap is None:
        attn = torch.where(allow, bias, torch.full((), -math.inf, dtype=q.dtype,
                                                    device=q.device))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn, scale=scale,
                                              enable_gqa=True)
    rep = h // k.shape[1]
    ke, ve = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q, ke.transpose(-1, -2)) * (1 / math.sqrt(e) if scale is None else scale)
    s = softcap * torch.tanh(s / softcap) + bias
    keep = allow | ~allow.any(dim=-1, keepdim=True)  # no NaN reaches autograd
    w = torch.softmax(s.masked_fill(~keep, -math.inf), dim=-1) * allow
    return torch.matmul(w, ve)


# -- fused_linear_cross_entropy ----------------------------------------------------------

def fused_linear_cross_entropy(hidden, weight, targets, bias=None, ignore_index=-100,
                               label_smoothing=0.0, z_loss=0.0, softcap=None):
    z = F.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, targets, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    if z_loss:
        keep = targets != ignore_index
        lse = torch.logsumexp(z, dim=-1)
        # lse·(z_loss·lse/n): every summand is at most the mean itself, so float16 overflows
        # only where the result does (lse² alone overflows from |lse| ≈ 256)
        n = keep.sum().clamp(min=1).to(z.dtype)
        terms = lse * (z_loss * lse / n)
        loss = loss + torch.where(keep, terms, torch.zeros_like(terms)).sum()
    return loss
