"""The suite catches realistic bugs in the modern family (mutation testing).

Each mutant is torch-cpu's own implementation with one realistic bug, run through the real
harness; everything else delegates to the real backend functions, so a failure can only
come from the bug.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")

import torch
import torch.nn.functional as F

from lmspec.backends import torch_modern as tm
from lmspec.backends import torch_training as tt

# -- rms_norm ------------------------------------------------------------------------------


def rms_eps_outside_sqrt(x, weight=None, eps=1e-6):
    y = x / (torch.sqrt((x * x).mean(-1, keepdim=True)) + eps)
    return y if weight is None else y * weight


def rms_centred(x, weight=None, eps=1e-6):
    """Layer norm without a bias: the mean is subtracted first."""
    return F.layer_norm(x, (x.shape[-1],), weight, None, eps)


def rms_float16_sum_of_squares(x, weight=None, eps=1e-6):
    """Σx² formed in the input dtype before dividing by D: overflows float16 (8·100² >
    65504) where mean(x²) fits."""
    ss = (x * x).sum(-1, keepdim=True, dtype=x.dtype) / x.shape[-1]
    y = x * torch.rsqrt(ss + eps)
    return y if weight is None else y * weight


def rms_gradient_treats_rms_as_constant(x, weight=None, eps=1e-6):
    """Forward exact; the backward misses the path through the mean square."""
    r = torch.sqrt((x * x).mean(-1, keepdim=True) + eps).detach()
    return x / r if weight is None else x / r * weight


# -- rotary_embedding ------------------------------------------------------------------------


def rope_layout_swapped(x, positions, base=10000.0, interleaved=False, rotary_dim=None):
    return tm.rotary_embedding(x, positions, base, not interleaved, rotary_dim)


def rope_theta_over_e(x, positions, base=10000.0, interleaved=False, rotary_dim=None):
    """Frequencies base^(−2i/E) instead of base^(−2i/rotary_dim) for partial rotary."""
    r = rotary_dim or x.shape[-1]
    half = r // 2
    inv = base ** (-torch.arange(0, r, 2, dtype=torch.float64) / x.shape[-1])
    ang = positions.double()[..., None] * inv
    ang = ang[:, None] if ang.dim() == 3 else ang
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    if interleaved:
        a, b = x[..., 0:r:2], x[..., 1:r:2]
        turned = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    else:
        a, b = x[..., :half], x[..., half:r]
        turned = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    return torch.cat([turned, x[..., r:]], -1)


def rope_first_row_positions(x, positions, base=10000.0, interleaved=False, rotary_dim=None):
    """[B,T] positions: the first row's positions used for every batch row."""
    if positions.dim() == 2:
        positions = positions[0]
    return tm.rotary_embedding(x, positions, base, interleaved, rotary_dim)


# -- gated_mlp -------------------------------------------------------------------------------


def gated_gate_on_up(x, W_gate, W_up, W_down, activation="silu"):
    """The activation applied to the up projection instead of the gate."""
    return tm.gated_mlp(x, W_up, W_gate, W_down, activation)


def gated_gelu_variants_swapped(x, W_gate, W_up, W_down, activation="silu"):
    swap = {"gelu": "gelu_tanh", "gelu_tanh": "gelu"}
    return tm.gated_mlp(x, W_gate, W_up, W_down, swap.get(activation, activation))


# -- grouped_query_attention ---------------------------------------------------------------------


def _gqa_with(**changes):
    """GQA through the real backend with one piece of the mask/bias logic replaced."""

    def gqa(q, k, v, mask=None, is_causal=False, scale=None, q_offset=0, window=None,
            alibi_slopes=None, softcap=None):
        kw = {"mask": mask, "is_causal": is_causal, "scale": scale, "q_offset": q_offset,
              "window": window, "alibi_slopes": alibi_slopes, "softcap": softcap}
        for key, fn in changes.items():
            kw[key] = fn(kw)
        if "kv" in kw:
            k, v = kw.pop("kv")(k, v, q.shape[1])
        return tm.grouped_query_attention(q, k, v, **{n: kw[n] for n in (
            "mask", "is_causal", "scale", "q_offset", "window", "alibi_slopes", "softcap")})

    return gqa


def _tiled(k, v, h):
    """Query head j reads key/value head j % g (k.repeat tiles the heads)."""
    rep = h // k.shape[1]
    return k.repeat(1, rep, 1, 1), v.repeat(1, rep, 1, 1)


gqa_head_mapping_modulo = _gqa_with(kv=lambda kw: _tiled)
gqa_alibi_sign = _gqa_with(alibi_slopes=lambda kw: None if kw["alibi_slopes"] is None
                           else -kw["alibi_slopes"])


def gqa_causal_ignores_q_offset(q, k, v, mask=None, is_causal=False, scale=None, q_offset=0,
                                window=None, alibi_slopes=None, softcap=None):
    """Causal mask top-left (j ≤ i) whatever q_offset is; window and ALiBi keep it."""
    if is_causal:
        causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        mask = causal if mask is None else tm._as_4d(mask) & causal
    return tm.grouped_query_attention(q, k, v, mask, False, scale, q_offset, window,
                                      alibi_slopes, softcap)


def gqa_window_off_by_one(q, k, v, mask=None, is_causal=False, scale=None, q_offset=0,
                          window=None, alibi_slopes=None, softcap=None):
    """The window's left edge excluded (−left < j − pos instead of ≤) for left ≥ 1."""
    if window is not None and window[0]:
        window = (window[0] - 1, window[1])
    return tm.grouped_query_attention(q, k, v, mask, is_causal, scale, q_offset, window,
                                      alibi_slopes, softcap)


def gqa_softcap_without_division(q, k, v, mask=None, is_causal=False, scale=None, q_offset=0,
                                 window=None, alibi_slopes=None, softcap=None):
    """cap·tanh(s) instead of cap·tanh(s/cap)."""
    if softcap is None:
        return tm.grouped_query_attention(q, k, v, mask, is_causal, scale, q_offset, window,
                                          alibi_slopes, softcap)
    s = (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    return tm.grouped_query_attention(q * (s * softcap), k, v, mask, is_causal, 1.0, q_offset,
                                      window, alibi_slopes, softcap)


def gqa_nan_for_query_without_keys(q, k, v, mask=None, is_causal=False, scale=None, q_offset=0,
                                   window=None, alibi_slopes=None, softcap=None):
    """The textbook masked_fill(−inf) + softmax: 0/0 = NaN where a query sees no key."""
    allow, rel = tm._visible(q.shape[2], k.shape[2], is_causal, q_offset, window, q.device)
    allow = allow if mask is None else allow & tm._as_4d(mask)
    rep = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ ke.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        sl = alibi_slopes.reshape(-1 if alibi_slopes.dim() == 1 else q.shape[0], q.shape[1])
        s = s - sl[:, :, None, None] * rel.abs().to(s.dtype)
    return torch.softmax(s.masked_fill(~allow, -math.inf), -1) @ ve


def gqa_straight_through_softcap(q, k, v, mask=None, is_causal=False, scale=None, q_offset=0,
                                 window=None, alibi_slopes=None, softcap=None):
    """Forward exact; the backward skips the cap's 1 − tanh² (a straight-through cap)."""
    if softcap is None:
        return tm.grouped_query_attention(q, k, v, mask, is_causal, scale, q_offset, window,
                                          alibi_slopes, softcap)
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    e = q.shape[-1]
    ident = tm.grouped_query_attention(q, k, v, mask, is_causal, scale, q_offset, window,
                                       alibi_slopes, 1e30 * max(1.0, abs(s)) * e)
    exact = tm.grouped_query_attention(q, k, v, mask, is_causal, scale, q_offset, window,
                                       alibi_slopes, softcap)
    return ident + (exact - ident).detach()


# -- fused_linear_cross_entropy ------------------------------------------------------------------


def _flce_parts(hidden, weight, targets, bias, ignore_index, softcap):
    z = F.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z, targets != ignore_index


def flce_z_loss_not_squared(hidden, weight, targets, bias=None, ignore_index=-100,
                            label_smoothing=0.0, z_loss=0.0, softcap=None):
    z, keep = _flce_parts(hidden, weight, targets, bias, ignore_index, softcap)
    loss = F.cross_entropy(z, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, -1)
    return loss + z_loss * torch.where(keep, lse, 0 * lse).sum() / keep.sum().clamp(min=1)


def flce_z_loss_over_all_rows(hidden, weight, targets, bias=None, ignore_index=-100,
                              label_smoothing=0.0, z_loss=0.0, softcap=None):
    z, _ = _flce_parts(hidden, weight, targets, bias, ignore_index, softcap)
    loss = F.cross_entropy(z, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return loss + z_loss * (torch.logsumexp(z, -1) ** 2).mean()


def flce_z_loss_unshifted_logsumexp(hidden, weight, targets, bias=None, ignore_index=-100,
                                    label_smoothing=0.0, z_loss=0.0, softcap=None):
    """log Σ exp(z) without the max shift: exp overflows float16 from z ≈ 11."""
    z, keep = _flce_parts(hidden, weight, targets, bias, ignore_index, softcap)
    loss = F.cross_entropy(z, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if not z_loss:
        return loss
    lse = torch.log(torch.exp(z).sum(-1))
    return loss + z_loss * torch.where(keep, lse * lse, 0 * lse).sum() / keep.sum().clamp(min=1)


def flce_bias_gradient_dropped(hidden, weight, targets, bias=None, ignore_index=-100,
                               label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Forward exact; the bias gets no gradient (a fused kernel that forgot ∂b)."""
    return tm.fused_linear_cross_entropy(hidden, weight, targets,
                                         None if bias is None else bias.detach(), ignore_index,
                                         label_smoothing, z_loss, softcap)


def flce_softcap_after_loss_shift(hidden, weight, targets, bias=None, ignore_index=-100,
                                  label_smoothing=0.0, z_loss=0.0, softcap=None):
    """softcap ignored: the raw logits go into the loss."""
    return tm.fused_linear_cross_entropy(hidden, weight, targets, bias, ignore_index,
                                         label_smoothing, z_loss, None)


# -- sample_token ----------------------------------------------------------------------------


def sample_min_p_absolute(logits, u, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """min-p read as an absolute threshold (keep p ≥ min_p), not relative to the largest
    probability."""
    if temperature == 0 or min_p == 0:
        return tt.sample_token(logits, u, temperature, top_k, top_p)
    p, order = torch.sort(torch.softmax(tt._scaled(logits, temperature), -1), dim=-1,
                          descending=True, stable=True)
    rank = torch.arange(p.shape[-1])
    p = tt._renormalised(p, rank < (top_k or p.shape[-1]))
    if top_p < 1:
        p = tt._renormalised(p, (torch.cumsum(p, -1) - p < top_p) | (rank == 0))
    p = tt._renormalised(p, (p >= min_p) | (rank == 0))
    cum = torch.cumsum(p, -1)
    pick = torch.minimum(torch.searchsorted(cum, u[:, None].to(cum.dtype), right=True)[:, 0],
                         (p > 0).sum(-1) - 1)
    return order.gather(-1, pick[:, None])[:, 0]


MUTANTS = {
    "rms: eps outside the square root": ("rms_norm", rms_eps_outside_sqrt, "forward", "float64"),
    "rms: mean subtracted (layer norm)": ("rms_norm", rms_centred, "forward", "float64"),
    "rms: float16 sum of squares overflows": ("rms_norm", rms_float16_sum_of_squares, "forward",
                                              "float16"),
    "rms: gradient treats the rms as constant": ("rms_norm", rms_gradient_treats_rms_as_constant,
                                                 "vjp", "float64"),
    "rope: pair layout swapped": ("rotary_embedding", rope_layout_swapped, "forward", "float64"),
    "rope: θ over E for partial rotary": ("rotary_embedding", rope_theta_over_e, "forward",
                                          "float64"),
    "rope: first row's positions for all": ("rotary_embedding", rope_first_row_positions,
                                            "forward", "float64"),
    "gated: activation on the up projection": ("gated_mlp", gated_gate_on_up, "forward",
                                               "float64"),
    "gated: exact and tanh GELU swapped": ("gated_mlp", gated_gelu_variants_swapped, "forward",
                                           "float64"),
    "gqa: head j reads j % g": ("grouped_query_attention", gqa_head_mapping_modulo, "forward",
                                "float64"),
    "gqa: causal ignores q_offset": ("grouped_query_attention", gqa_causal_ignores_q_offset,
                                     "forward", "float64"),
    "gqa: window left edge off by one": ("grouped_query_attention", gqa_window_off_by_one,
                                         "forward", "float64"),
    "gqa: ALiBi sign": ("grouped_query_attention", gqa_alibi_sign, "forward", "float64"),
    "gqa: softcap without the division": ("grouped_query_attention", gqa_softcap_without_division,
                                          "forward", "float64"),
    "gqa: NaN for a query with no key": ("grouped_query_attention", gqa_nan_for_query_without_keys,
                                         "forward", "float64"),
    "gqa: straight-through softcap gradient": ("grouped_query_attention",
                                               gqa_straight_through_softcap, "vjp", "float64"),
    "flce: z-loss not squared": ("fused_linear_cross_entropy", flce_z_loss_not_squared,
                                 "forward", "float64"),
    "flce: z-loss over ignored rows too": ("fused_linear_cross_entropy",
                                           flce_z_loss_over_all_rows, "forward", "float64"),
    "flce: float16 unshifted logsumexp": ("fused_linear_cross_entropy",
                                          flce_z_loss_unshifted_logsumexp, "forward", "float16"),
    "flce: bias gradient dropped": ("fused_linear_cross_entropy", flce_bias_gradient_dropped,
                                    "vjp", "float64"),
    "flce: softcap ignored": ("fused_linear_cross_entropy", flce_softcap_after_loss_shift,
                              "forward", "float64"),
    "sample: min_p as an absolute threshold": ("sample_token", sample_min_p_absolute, "forward",
                                               "float64"),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(run_mutant, name):
    op, fn, check, dtype = MUTANTS[name]
    results = run_mutant(op, fn, dtypes=(dtype,), checks=(check,), max_examples=100)
    failing = [r for r in results if r["status"] == "fail"]
    assert failing, f"{name} went unnoticed: {[(r['check'], r['status']) for r in results]}"
    assert failing[0]["counterexample"] is not None and failing[0]["reproduce"]


def test_properties_catch_head_mapping_without_the_reference(run_mutant):
    """The reference-free property sees the j % g bug on its own."""
    results = run_mutant("grouped_query_attention", gqa_head_mapping_modulo,
                         checks=("repeated_kv_heads_change_nothing",), max_examples=60)
    assert [r["status"] for r in results] == ["fail"]


def test_properties_catch_causal_offset_without_the_reference(run_mutant):
    results = run_mutant("grouped_query_attention", gqa_causal_ignores_q_offset,
                         checks=("decode_equals_last_rows",), max_examples=60)
    assert [r["status"] for r in results] == ["fail"]


def test_properties_catch_eps_outside_sqrt_without_the_reference(run_mutant):
    results = run_mutant("rms_norm", rms_eps_outside_sqrt, checks=("unit_mean_square",),
                         max_examples=60)
    assert [r["status"] for r in results] == ["fail"]
