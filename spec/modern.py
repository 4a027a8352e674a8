"""Modern family: the kernels of current language models (CONTRACT §2, added 2026-11-29).

RMS normalization (Zhang & Sennrich 2019), rotary position embeddings (Su et al. 2021),
gated feed-forward blocks (SwiGLU/GeGLU, Shazeer 2020), grouped-query attention
(Ainslie et al. 2023) with a query offset for decoding, sliding windows (Beltagy et al.
2020; Jiang et al. 2023), ALiBi biases (Press et al. 2022) and score soft-capping
(Gemma 2, Gemma Team 2024), and a fused linear + cross-entropy loss with z-loss
(Chowdhery et al. 2022).

As in :mod:`lmspec.attention`, each forward is ``_*_fwd(...) -> (output, pullback)`` and
the pullback is the hand-derived vector-Jacobian product, closed over the forward's
intermediates. Every argument is validated (CONTRACT §1, §6 ranges).

Readings chosen where the contract is silent: rotary ``positions`` may be any integers
(negative included; the rotation is defined for every angle); ``eps`` of ``rms_norm`` is
``≥ 0`` (with ``eps = 0`` an all-zero row gives NaN, 0/0); the attention ``scale`` and
``softcap``, ``z_loss`` and ``base`` must be finite.
"""

from __future__ import annotations

import math

import numpy as np

from . import _validate as v
from ._catalogue import reference, vjp_rule
from ._precision import activation, fl
from .blocks import activation_forward, attend, linear, sigmoid
from .core import log_softmax, logsumexp, softmax

# -- rms_norm ----------------------------------------------------------------------------


def _check_rms(x, weight, eps):
    op = "rms_norm"
    xx = v.floats(op, "x", x, min_ndim=1)
    d = xx.shape[-1]
    w = None if weight is None else v.floats(op, "weight", weight, shape=(d,))
    e = v.real(op, "eps", eps, low=0.0)
    if not math.isfinite(e):
        v.fail(op, "eps", "a finite number >= 0", repr(eps))
    return xx, w, fl(e)


def _rms_fwd(x, w, eps):
    """``r = √(mean(x²) + ε)``, ``x̂ = x/r``, ``y = x̂ ⊙ w``. Pullback, with ``g = ∂y ⊙ w``:
    ``∂x = (g − x̂ · mean(g ⊙ x̂)) / r``, ``∂w = Σ ∂y ⊙ x̂``."""
    r = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    xhat = x / r

    def back(dy):
        g = dy if w is None else dy * w
        dx = (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True)) / r
        dw = None if w is None else np.sum(dy * xhat, axis=tuple(range(x.ndim - 1)))
        return dx, dw

    return (xhat if w is None else xhat * w), back


@reference("modern", diff=("x", "weight"))
def rms_norm(x, weight=None, eps=1e-6):
    """``y = x / √(mean(x², last axis) + ε) ⊙ weight`` (Zhang & Sennrich 2019).

    No centring and no bias, unlike layer norm; ``weight`` None means ones. ``ε ≥ 0``
    inside the square root.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        y, _ = _rms_fwd(*_check_rms(x, weight, eps))
    return y


@vjp_rule(rms_norm)
def _rms_norm_vjp(cot, x, weight=None, eps=1e-6):
    """``∂x = (g − x̂ · mean(g ⊙ x̂)) / r`` with ``g = ∂y ⊙ w``, ``r = √(mean(x²) + ε)``,
    ``x̂ = x/r``; ``∂w = Σ ∂y ⊙ x̂`` over every axis but the last."""
    with np.errstate(invalid="ignore", divide="ignore"):
        _, back = _rms_fwd(*_check_rms(x, weight, eps))
        dx, dw = back(fl(cot))
    return {"x": dx, "weight": dw}


# -- rotary_embedding --------------------------------------------------------------------



def _check_rotary(x, positions, base, interleaved, rotary_dim):
    op = "rotary_embedding"
    xx = v.floats(op, "x", x, ndim=4)
    b, _, t, e = xx.shape
    pos = v.ints(op, "positions", positions)
    if pos.shape not in ((t,), (b, t)):
        v.fail(op, "positions", f"shape [T={t}] or [B={b}, T={t}]", f"shape {pos.shape}")
    bb = v.real(op, "base", base, low=0.0, low_open=True)
    if not math.isfinite(bb):
        v.fail(op, "base", "a finite number > 0", repr(base))
    inter = v.flag(op, "interleaved", interleaved)
    if rotary_dim is None:
        if e % 2:
            v.fail(op, "x", "an even last axis E when rotary_dim is None", f"shape {xx.shape}")
        r = e
    else:
        r = v.integer(op, "rotary_dim", rotary_dim, low=2)
        if r % 2 or r > e:
            v.fail(op, "rotary_dim", f"None or an even int in [2, E={e}]", repr(rotary_dim))
    return xx, pos, bb, inter, r


def _rotary_fwd(x, pos, base, interleaved, r):
    """Pair ``i`` of features, ``(a, b)``, turns by ``φ = pos·θ_i``, ``θ_i = base^(−2i/r)``:
    ``(a, b) → (a cos φ − b sin φ, a sin φ + b cos φ)``. A rotation's transpose is the
    rotation by ``−φ``, so the pullback is ``(∂a, ∂b) → (∂a cos + ∂b sin, −∂a sin + ∂b cos)``."""
    half = r // 2
    theta = fl(base) ** (-fl(2 * np.arange(half)) / fl(r))
    p = fl(pos)[..., None] * theta  # [T, r/2] or [B, T, r/2]
    angle = p[:, None] if p.ndim == 3 else p  # broadcast over heads: [B, 1, T, r/2]
    cos, sin = np.cos(angle), np.sin(angle)
    ia, ib = (np.arange(0, r, 2), np.arange(1, r, 2)) if interleaved else (
        np.arange(half), np.arange(half, r))

    def turn(z, s):
        out = z.copy()
        a, bb = z[..., ia], z[..., ib]
        out[..., ia] = a * cos - s * bb * sin
        out[..., ib] = s * a * sin + bb * cos
        return out

    return turn(x, 1), lambda dy: turn(dy, -1)


@reference("modern", diff=("x",))
def rotary_embedding(x, positions, base=10000.0, interleaved=False, rotary_dim=None):
    """Rotary position embedding (Su et al. 2021, RoFormer) of ``x[B,h,T,E]``.

    ``r = rotary_dim or E`` (even, ``≤ E``); ``θ_i = base^(−2i/r)`` and angle
    ``φ_{t,i} = positions[t]·θ_i`` for ``i < r/2`` (``positions`` ``[T]`` or ``[B,T]``
    integers); pair ``i`` is ``(x[…,i], x[…,i+r/2])`` ("rotate half", GPT-NeoX/Llama) or,
    with ``interleaved``, ``(x[…,2i], x[…,2i+1])`` (GPT-J, RoFormer); each pair
    ``(a, b) → (a cos φ − b sin φ, a sin φ + b cos φ)``. Features ``≥ r`` pass unchanged.
    """
    y, _ = _rotary_fwd(*_check_rotary(x, positions, base, interleaved, rotary_dim))
    return y


@vjp_rule(rotary_embedding)
def _rotary_embedding_vjp(cot, x, positions, base=10000.0, interleaved=False, rotary_dim=None):
    """Each pair's rotation is orthogonal: ``∂x`` is ``∂y`` rotated by ``−φ``; the features
    ``≥ r`` pass ``∂y`` through."""
    _, back = _rotary_fwd(*_check_rotary(x, positions, base, interleaved, rotary_dim))
    return {"x": back(fl(cot))}


# -- gated_mlp ---------------------------------------------------------------------------

GELU_TANH_C = 0.044715



def _gate_fwd(a: np.ndarray, kind: str):
    """``silu(a) = a σ(a)`` (``∂ = σ(a)(1 + a(1 − σ(a)))``), exact GELU ``a Φ(a)``, or
    ``gelu_tanh(a) = a (1 + tanh(√(2/π)(a + 0.044715 a³)))/2`` (Hendrycks & Gimpel 2016),
    ``∂ = (1 + t)/2 + a (1 − t²) √(2/π)(1 + 3·0.044715 a²)/2``."""
    if kind == "gelu":
        return activation_forward(a, "gelu")
    if kind == "silu":
        s = sigmoid(a)
        return a * s, lambda dy: dy * s * (1 + a * (1 - s))
    c, k = fl(math.sqrt(2 / math.pi)), fl(GELU_TANH_C)
    t = activation(np.tanh(c * (a + k * a * a * a)))
    half = fl(0.5)
    return half * a * (1 + t), lambda dy: dy * (half * (1 + t) + half * a * (1 - t * t) * c
                                                * (1 + 3 * k * a * a))


GATES = ("silu", "gelu", "gelu_tanh")


def _check_gated(x, W_gate, W_up, W_down, activation):
    op = "gated_mlp"
    xx = v.floats(op, "x", x, min_ndim=1)
    d = xx.shape[-1]
    v.positive_dims(op, "x", xx, {-1: "D"})
    wg = v.floats(op, "W_gate", W_gate, shape=(None, d))
    v.positive_dims(op, "W_gate", wg, {0: "F"})
    f = wg.shape[0]
    v.budget(op, "W_gate", xx.size // d * f, "hidden activations [..., F]")
    wu = v.floats(op, "W_up", W_up, shape=(f, d))
    wd = v.floats(op, "W_down", W_down, shape=(d, f))
    v.one_of(op, "activation", activation, GATES)
    return xx, wg, wu, wd, activation


def _gated_fwd(x, W_gate, W_up, W_down, activation):
    """``y = (act(x W_gateᵀ) ⊙ x W_upᵀ) W_downᵀ``. Pullback: ``∂h = ∂y W_down``,
    ``∂a = ∂h ⊙ b ⊙ act'(a)``, ``∂b = ∂h ⊙ act(a)``, ``∂x = ∂a W_gate + ∂b W_up``, the
    weight gradients ``Σ ∂yᵀ h``, ``Σ ∂aᵀ x``, ``Σ ∂bᵀ x``."""
    a, back_a = linear(x, W_gate, None)
    b, back_b = linear(x, W_up, None)
    g, back_g = _gate_fwd(a, activation)
    y, back_y = linear(g * b, W_down, None)

    def back(dy):
        dh, dW_down, _ = back_y(dy)
        dx_a, dW_gate, _ = back_a(back_g(dh * b))
        dx_b, dW_up, _ = back_b(dh * g)
        return {"x": dx_a + dx_b, "W_gate": dW_gate, "W_up": dW_up, "W_down": dW_down}

    return y, back


@reference("modern", diff=("x", "W_gate", "W_up", "W_down"))
def gated_mlp(x, W_gate, W_up, W_down, activation="silu"):
    """Gated feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer"):
    ``y = (act(x W_gateᵀ) ⊙ x W_upᵀ) W_downᵀ`` with ``act`` ``silu`` (SwiGLU), ``gelu``
    (exact erf form, GeGLU) or ``gelu_tanh`` (the tanh approximation). No biases.
    """
    with np.errstate(over="ignore"):
        y, _ = _gated_fwd(*_check_gated(x, W_gate, W_up, W_down, activation))
    return y


@vjp_rule(gated_mlp)
def _gated_mlp_vjp(cot, x, W_gate, W_up, W_down, activation="silu"):
    """The linear pullbacks around ``∂(act(a) ⊙ b)``: ``∂a = ∂h ⊙ b ⊙ act'(a)``,
    ``∂b = ∂h ⊙ act(a)``."""
    with np.errstate(over="ignore"):
        _, back = _gated_fwd(*_check_gated(x, W_gate, W_up, W_down, activation))
        return back(fl(cot))


# -- grouped_query_attention -------------------------------------------------------------


def _finite(op: str, name: str, value: object, **kw) -> float:
    r = v.real(op, name, value, **kw)
    if not math.isfinite(r):
        v.fail(op, name, "a finite number" + (" > 0" if kw.get("low_open") else ""),
               repr(value))
    return r


def _check_window(op: str, window) -> tuple[int | None, int | None] | None:
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        v.fail(op, "window", "None or a pair (left, right)", repr(window))
    return tuple(None if w is None else v.integer(op, "window", w, low=0)  # type: ignore
                 for w in window)


def visibility(n_q: int, n_k: int, q_offset: int, is_causal: bool,
               window: tuple[int | None, int | None] | None) -> tuple[np.ndarray, np.ndarray]:
    """``(allow[L, S], rel[L, S])``: key ``j`` (position ``j``) is visible to query ``i``
    (position ``q_offset + i``) iff ``j ≤ q_offset + i`` when causal and ``−left ≤ rel ≤
    right`` for ``window = (left, right)``; ``rel = j − (q_offset + i)``. Shared with the
    serving family's paged attention."""
    rel = np.arange(n_k)[None, :] - (q_offset + np.arange(n_q))[:, None]
    allow = np.ones((n_q, n_k), dtype=bool)
    if is_causal:
        allow &= rel <= 0
    if window is not None:
        left, right = window
        if left is not None:
            allow &= rel >= -left
        if right is not None:
            allow &= rel <= right
    return allow, rel


def _check_gqa(q, k, v_, mask, is_causal, scale, q_offset, window, alibi_slopes, softcap):
    op = "grouped_query_attention"
    qq = v.floats(op, "q", q, ndim=4)
    b, h, n_q, e = qq.shape
    kk = v.floats(op, "k", k, ndim=4)
    if kk.shape[0] != b or kk.shape[3] != e or kk.shape[1] < 1 or h % kk.shape[1]:
        v.fail(op, "k", f"shape [B={b}, g, S, E={e}] with h={h} a multiple of g",
               f"shape {kk.shape}")
    g, n_k = kk.shape[1], kk.shape[2]
    v.positive_dims(op, "q", qq, {2: "L"})
    v.positive_dims(op, "k", kk, {2: "S"})
    v.budget(op, "k", b * h * n_q * n_k, "score matrix [B, h, L, S]")
    vv = v.floats(op, "v", v_, shape=(b, g, n_k, None))
    full = (b, h, n_q, n_k)
    m = v.scores_mask(op, mask, full)
    causal = v.flag(op, "is_causal", is_causal)
    scale = v.default_scale(op, qq, scale)
    s = _finite(op, "scale", scale)
    off = v.integer(op, "q_offset", q_offset)
    win = _check_window(op, window)
    slopes = None
    if alibi_slopes is not None:
        slopes = v.floats(op, "alibi_slopes", alibi_slopes)
        if slopes.shape not in ((h,), (b, h)):
            v.fail(op, "alibi_slopes", f"shape [h={h}] or [B={b}, h={h}]",
                   f"shape {slopes.shape}")
    cap = None if softcap is None else _finite(op, "softcap", softcap, low=0.0, low_open=True)
    allow, rel = visibility(n_q, n_k, off, causal, win)
    allow = allow if m is None else m & allow
    if m is None and not causal and win is None:
        allow = None  # every key visible: the softmax needs no mask
    return qq, kk, vv, None if allow is None else np.broadcast_to(allow, full), s, rel, slopes, cap


def gqa_scores(q, k, scale, rel, slopes, cap):
    """The grouped scores ``[B, g, (h/g)·L, S]`` of ``q[B,h,L,E]`` against ``k[B,g,S,E]``:
    ``s = scale·q kᵀ`` (key/value head ``j // (h/g)`` for query head ``j``), capped
    ``s ← c·tanh(s/c)``, biased ``s −= slope·|rel|``; and the pullback ``∂s -> (∂q, ∂k)``
    (the bias is constant; the cap multiplies by ``1 − tanh²``; ``∂q = scale·∂s K``,
    ``∂K = scale·∂sᵀ q``, summed over the ``h/g`` query heads that share a key/value head).

    The ``h/g`` query heads of a group are stacked along the rows (``[B, g, (h/g)·L, E]``,
    a free reshape of ``[B, h, L, E]``), so each product is one GEMM per key/value head
    against the unrepeated keys, and the sums over a group fall out of ``∂sᵀ q``. Shared
    with the serving family's paged attention."""
    b, h, n_q, e = q.shape
    g = k.shape[1]
    rep = h // g
    qg = np.ascontiguousarray(q).reshape(b, g, rep * n_q, e)
    s = qg @ np.swapaxes(k, -1, -2)
    s *= fl(scale)
    t = None
    if cap is not None:
        t = activation(np.tanh(s / fl(cap)))
        s = fl(cap) * t
    if slopes is not None:
        sl = slopes[None, :] if slopes.ndim == 1 else slopes
        s = (s.reshape(b, h, n_q, -1) - sl[:, :, None, None] * fl(np.abs(rel))).reshape(s.shape)

    def back(ds):
        if t is not None:
            ds = ds * (1 - t * t)
        dq = ds @ k
        dq *= fl(scale)
        dk = np.swapaxes(ds, -1, -2) @ qg
        dk *= fl(scale)
        return dq.reshape(b, h, n_q, e), dk

    return s, back


def _gqa_fwd(q, k, v_, allow, scale, rel, slopes, cap):
    """``O = softmax_visible(s) V`` over the scores of :func:`gqa_scores`. Pullback: the
    attention pullback gives ``∂s`` and ``∂V = Pᵀ ∂O`` (summed over a group by the
    product), then :func:`gqa_scores`' pullback."""
    b, h, n_q, _ = q.shape
    g = k.shape[1]
    rep = h // g

    def grouped(x):  # [B, h, L, ·] -> [B, g, (h/g)·L, ·]
        return x.reshape(b, g, rep * n_q, x.shape[-1])

    s, score_back = gqa_scores(q, k, scale, rel, slopes, cap)
    allow_g = None if allow is None else grouped(np.ascontiguousarray(allow))
    (out, _), attend_back = attend(s, allow_g, v_, overwrite=True)

    def back(d_out):
        ds, dv = attend_back(grouped(np.ascontiguousarray(d_out)))
        dq, dk = score_back(ds)
        return {"q": dq, "k": dk, "v": dv}

    return out.reshape(b, h, n_q, -1), back


@reference("modern", diff=("q", "k", "v"))
def grouped_query_attention(q, k, v, mask=None, is_causal=False, scale=None, q_offset=0,
                            window=None, alibi_slopes=None, softcap=None):
    """Grouped-query attention (Ainslie et al. 2023; ``g = h`` is multi-head, ``g = 1``
    multi-query attention) of ``q[B,h,L,E]`` over ``k[B,g,S,E]``, ``v[B,g,S,Ev]``.

    Query head ``j`` reads key/value head ``j // (h/g)``. Query ``i`` sits at position
    ``q_offset + i``, key ``j`` at ``j``. Scores ``s = scale·q·kᵀ`` (``scale`` default
    ``1/√E``); with ``softcap`` ``s ← softcap·tanh(s/softcap)`` (Gemma 2); with
    ``alibi_slopes`` (``[h]`` or ``[B,h]``) ``s −= slope·|q_offset + i − j|`` (Press et al.
    2022). Key ``j`` is visible to query ``i`` iff ``mask`` (broadcasting to ``[B,h,L,S]``)
    allows it, ``j ≤ q_offset + i`` when ``is_causal``, and ``−left ≤ j − (q_offset + i) ≤
    right`` for ``window = (left, right)`` (either side None = unbounded; Beltagy et al.
    2020; Mistral's sliding window is ``(w − 1, 0)`` with causal, Jiang et al. 2023).
    Softmax over the visible keys; a query with no visible key gives zeros.
    """
    qq, kk, vv, allow, s, rel, sl, cap = _check_gqa(q, k, v, mask, is_causal, scale, q_offset,
                                                   window, alibi_slopes, softcap)
    out, _ = _gqa_fwd(qq, kk, vv, allow, s, rel, sl, cap)
    return out


@vjp_rule(grouped_query_attention)
def _grouped_query_attention_vjp(cot, q, k, v, mask=None, is_causal=False, scale=None,
                                 q_offset=0, window=None, alibi_slopes=None, softcap=None):
    """``∂V_g = Σ_{j in group g} P_jᵀ ∂O_j``, ``∂s = P ⊙ (∂O Vᵀ − rowsum)`` times
    ``1 − tanh²(s/c)`` under a cap, ``∂q = scale·∂s K``, ``∂K_g = scale·Σ_{j in g} ∂s_jᵀ q_j``.
    ``alibi_slopes`` is not differentiable (CONTRACT §6)."""
    qq, kk, vv, allow, s, rel, sl, cap = _check_gqa(q, k, v, mask, is_causal, scale, q_offset,
                                                   window, alibi_slopes, softcap)
    _, back = _gqa_fwd(qq, kk, vv, allow, s, rel, sl, cap)
    return back(fl(cot))


# -- fused_linear_cross_entropy ----------------------------------------------------------


def _check_flce(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, softcap):
    op = "fused_linear_cross_entropy"
    hh = v.floats(op, "hidden", hidden, ndim=2)
    n, d = hh.shape
    v.positive_dims(op, "hidden", hh, {1: "D"})
    w = v.floats(op, "weight", weight, shape=(None, d))
    vocab = w.shape[0]
    if vocab < 1:
        v.fail(op, "weight", "at least one class (V >= 1)", f"shape {w.shape}")
    v.budget(op, "weight", n * vocab, "logits [N, V]")
    b = None if bias is None else v.floats(op, "bias", bias, shape=(vocab,))
    ii = v.integer(op, "ignore_index", ignore_index)
    t = v.ints(op, "targets", targets, shape=(n,), low=0, high=vocab, allow=(ii,))
    eps = v.real(op, "label_smoothing", label_smoothing, low=0.0, high=1.0)
    zl = _finite(op, "z_loss", z_loss, low=0.0)
    cap = None if softcap is None else _finite(op, "softcap", softcap, low=0.0, low_open=True)
    return hh, w, t, b, ii, eps, zl, cap


def _flce_fwd(hidden, weight, targets, bias, ii, eps, zl, cap):
    """``z = hidden Wᵀ + b``, capped, ``row_n = CE_ε(z_n, y_n) + z_loss·lse(z_n)²``, mean
    over kept rows. Pullback per kept row: ``∂z_n = c/|R| · (p_n − (1−ε) onehot(y_n) − ε/V
    + 2·z_loss·lse(z_n)·p_n)``, times ``1 − tanh²`` under the cap, then the linear pullback
    (``∂hidden = ∂z W``, ``∂W = ∂zᵀ hidden``, ``∂b = Σ_n ∂z_n``)."""
    z, lin_back = linear(hidden, weight, bias)
    t = None
    if cap is not None:
        t = activation(np.tanh(z / fl(cap)))
        z = fl(cap) * t
    keep = targets != ii
    safe = np.where(keep, targets, 0)
    lp = log_softmax(z, -1)
    lse = logsumexp(z, -1)
    nll = -np.take_along_axis(lp, safe[:, None], axis=1)[:, 0]
    row = (1 - fl(eps)) * nll
    if eps:
        row = row + fl(eps) * -np.mean(lp, axis=1)
    if zl:
        row = row + fl(zl) * lse * lse
    count = fl(np.sum(keep))
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = np.sum(np.where(keep, row, 0)) / count

    def back(cot):
        p = softmax(z, -1)
        onehot = np.zeros_like(p)
        onehot[np.arange(len(targets))[keep], targets[keep]] = 1
        g = p - (1 - fl(eps)) * onehot - fl(eps) / fl(z.shape[1])
        if zl:
            g = g + 2 * fl(zl) * lse[:, None] * p
        dz = fl(cot) * np.where(keep[:, None], g, 0) / fl(max(int(np.sum(keep)), 1))
        if t is not None:
            dz = dz * (1 - t * t)
        dh, dw, db = lin_back(dz)
        return {"hidden": dh, "weight": dw, "bias": None if bias is None else db}

    return loss, back


@reference("modern", diff=("hidden", "weight", "bias"))
def fused_linear_cross_entropy(hidden, weight, targets, bias=None, ignore_index=-100,
                               label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The language-model head and its loss in one op:
    ``L = (1/|R|) Σ_{n∈R} [CE_ε(z_n, y_n) + z_loss·(logsumexp z_n)²]``,
    ``z = hidden Wᵀ + b``, optionally capped ``z ← softcap·tanh(z/softcap)`` (Gemma 2).

    ``CE_ε`` is :func:`lmspec.cross_entropy`'s row loss with ``label_smoothing = ε``;
    ``R`` the rows whose target is not ``ignore_index``; the z-loss keeps the softmax
    normaliser near 1 (Chowdhery et al. 2022, PaLM). NaN when every row is ignored
    (its gradient is then 0, as for ``cross_entropy``). ``z_loss ≥ 0``; ``softcap`` None
    or ``> 0``.
    """
    with np.errstate(over="ignore"):
        loss, _ = _flce_fwd(*_check_flce(hidden, weight, targets, bias, ignore_index,
                                         label_smoothing, z_loss, softcap))
    return loss


@vjp_rule(fused_linear_cross_entropy)
def _fused_linear_cross_entropy_vjp(cot, hidden, weight, targets, bias=None, ignore_index=-100,
                                    label_smoothing=0.0, z_loss=0.0, softcap=None):
    """``∂z_n = c/|R|·(p_n − (1−ε)·onehot(y_n) − ε/V + 2·z_loss·lse_n·p_n)`` for kept rows
    (0 for ignored ones; 0 everywhere when all are ignored), ``⊙ (1 − tanh²(z/c))`` under a
    cap; ``∂hidden = ∂z W``, ``∂W = ∂zᵀ hidden``, ``∂b = Σ_n ∂z_n``."""
    with np.errstate(over="ignore"):
        _, back = _flce_fwd(*_check_flce(hidden, weight, targets, bias, ignore_index,
                                         label_smoothing, z_loss, softcap))
        return back(cot)
