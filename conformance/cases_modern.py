"""Conformance inputs and properties of the modern family.

Inputs go where these kernels break: GQA ratios ``h/g`` of 1, 2, 4 and ``h`` (multi-query),
``L ≠ S`` with ``q_offset = S − L`` (decoding, ``L = 1``) and other offsets, negative ones
included; windows of 0 and 1, one-sided, Mistral's ``(w − 1, 0)`` and wider than the
sequence; ALiBi with and without causal; soft-capping of large scores; queries that see no
key; rotary embeddings with odd ``T``, ``rotary_dim < E``, positions not starting at 0 and
per-batch ``[B,T]`` positions, both pair layouts; RMS norm of tiny, offset and large rows;
saturated SwiGLU/GeGLU gates; fused cross-entropy with ignored rows, every row ignored
(NaN), ``V = 1``, label smoothing, z-loss, and logits past the dtype's range only where a
softcap brings them back.

Tolerance magnitudes (``scale``), as in :mod:`lmspec.conformance.cases_attention`: the size
of the output change a relative rounding ``u`` of the inputs and intermediates causes,
divided by ``u``. Attention: ``max|v|·max(1, |s|)`` with ``|s|`` bounded by
``scale·Σ|q||k|`` (by ``softcap`` under a cap: ``|s|·(1 − tanh²(s/c)) ≤ c``) plus the
largest ALiBi bias; rotary: ``max|x|·max(1, |positions|)`` (the angle ``p·θ`` is rounded
relative to its size); RMS norm: ``max|w|·max|x|/r``; gated MLP: ``(|x||W_gate|ᵀ ⊙
|x||W_up|ᵀ)|W_down|ᵀ``; fused cross-entropy: the logits' bound (``min(·, softcap)``)
times ``1 + 2·z_loss·|lse|``. A vjp's ``M`` is further multiplied by ``max|cotangent|`` and
by the largest input a weight gradient multiplies.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from . import draw as d
from . import large_shapes as big
from .cases_attention import (
    _abs,
    _cot,
    _grad_factor,
    _mask,
    _values,
    key_count,
    score_family,
    shape_scores,
)
from .declare import Call, Close, Holds, cases, prop

# -- rms_norm ----------------------------------------------------------------------------


@st.composite
def _rms(draw, dtype: str) -> Call:
    ndim = d.dim(draw, 1, 3, label="ndim")
    lead = [d.dim(draw, 1, 3, label=f"dim{i}") for i in range(ndim - 1)]
    dm = d.length(draw, 1, 8, label="D")
    regime = draw(st.sampled_from(["normal", "offset", "tiny", "large"]), label="x regime")
    big = 200.0 if dtype in ("float16", "bfloat16") else 1e4  # Σx² past float16's range
    lo, hi = {"normal": (-3, 3), "offset": (90, 110), "tiny": (-1e-3, 1e-3),
              "large": (big / 2, big)}[regime]
    x = d.floats(draw, dtype, (*lead, dm), lo, hi, label="x")
    if regime == "large":  # magnitudes in [big/2, big], signs drawn
        x = np.where(d.bools(draw, x.shape, label="x signs"), x, -x).astype(x.dtype)
    weight = None
    if draw(st.booleans(), label="weight given"):
        weight = d.floats(draw, dtype, (dm,), -2, 2, label="weight")
    eps = draw(st.sampled_from([1e-6, 1e-5, 1e-3, 0.5]), label="eps")
    return Call((x, weight), {"eps": eps})


def _rms_scale(call: Call, cot=None) -> float:
    """``max(1, max|w|)·max|x|/r`` (and ``1/min r`` more for a vjp), ``r = √(ms + ε)``."""
    x, w = call.args
    xa = _abs(x)
    r = np.sqrt(np.mean(xa * xa, axis=-1, keepdims=True) + call.kwargs["eps"])
    rel = float(np.max(xa / r, initial=1.0))
    wm = 1.0 if w is None else max(1.0, float(np.max(_abs(w))))
    if cot is None:
        return wm * rel
    return wm * rel * max(1.0, float(np.max(1 / r))) * _cot(cot)


def _rms_k(call: Call) -> int:
    x = call.args[0]
    return x.shape[-1] + x.size // max(1, x.shape[-1])


@st.composite
def _rms_large(draw, dtype: str) -> Call:
    """Large tier: rows of widths around the 64…4096-lane chunks of norm kernels."""
    dm = big.size(draw, big.WIDTHS, "D")
    rows = big.size(draw, (3, 1, 2, 5), "rows")
    regime = draw(st.sampled_from(["normal", "offset"]), label="x regime")
    lo, hi = {"normal": (-3, 3), "offset": (90, 110)}[regime]
    x = d.floats(draw, dtype, (rows, dm), lo, hi, label="x")
    weight = d.floats(draw, dtype, (dm,), -2, 2, label="weight") if draw(
        st.booleans(), label="weight given") else None
    return Call((x, weight), {"eps": draw(st.sampled_from([1e-6, 1e-5]), label="eps")})


cases("rms_norm", k=_rms_k, scale=_rms_scale, large=_rms_large)(_rms)


@st.composite
def _rms_rescaled(draw, dtype: str):
    return draw(_rms(dtype)), draw(st.sampled_from([0.25, 0.5, 2.0, 8.0]), label="c")


@prop("rms_norm", strategy=_rms_rescaled)
def scale_invariance(run, drawn, dtype: str):
    """rms_norm(c·x, ε·c²) = rms_norm(x, ε) for a power of two c (c·x is exact)."""
    call, c = drawn
    x, w = call.args
    eps = call.kwargs["eps"]
    if not np.all(np.isfinite(x.astype(np.float64) * c)) or c * np.max(_abs(x)) > 1e4 and (
            dtype == "float16"):
        return
    cx = (x.astype(np.float64) * c).astype(x.dtype)
    yield Close("rms_norm(c·x, c²ε) = rms_norm(x, ε)", run("rms_norm", cx, w, eps=eps * c * c),
                run("rms_norm", x, w, eps=eps), k=_rms_k(call), scale=_rms_scale(call))


@prop("rms_norm")
def unit_mean_square(run, call: Call, dtype: str):
    """Without a weight each row has mean(y²) = ms/(ms + ε), ms = mean(x²); with one,
    y = rms_norm(x)·weight."""
    x, w = call.args
    eps = call.kwargs["eps"]
    y = run("rms_norm", x, None, eps=eps)
    ms = np.mean(_abs(x) ** 2, axis=-1)
    dm = x.shape[-1]
    yield Close("mean(y²) = ms/(ms + ε)", np.mean(y * y, axis=-1), ms / (ms + eps), k=dm,
                scale=2 * math.sqrt(dm) * _rms_scale(Call((x, None), call.kwargs)))
    if w is not None:
        yield Close("rms_norm(x, w) = rms_norm(x)·w", run("rms_norm", x, w, eps=eps),
                    y * w.astype(np.float64), k=dm, scale=_rms_scale(call))


# -- rotary_embedding --------------------------------------------------------------------


LONG_CONTEXT = (1000, 8192, 32768, 99_990)
"""Starting positions of the ``"long context"`` kind, 10³…10⁵: the angle ``p·θ_0 = p`` of
a rotary embedding is then far beyond what half precision holds (float16's spacing at
32768 is 32, bfloat16's at 1000 is 8), so angles or their cos/sin formed in the input
dtype are wrong by whole turns."""


def _positions(draw, shape, label: str) -> np.ndarray:
    kind = draw(st.sampled_from(["from 0", "offset", "large offset", "negative", "random",
                                 "long context"]), label=f"{label} kind")
    t = shape[-1]
    if kind == "random":
        return d.ints(draw, shape, 4096, label=label)
    start = {"from 0": 0, "offset": 5, "large offset": 2000, "negative": -3}.get(kind)
    if start is None:
        start = draw(st.sampled_from(LONG_CONTEXT), label=f"{label} start")
    starts = np.full(shape[:-1] + (1,), start, dtype=np.int64)
    if len(shape) == 2:  # rows of a batch start at different positions (left padding)
        starts = starts + d.ints(draw, (shape[0], 1), 50, label=f"{label} row starts")
    return starts + np.arange(t, dtype=np.int64)


@st.composite
def _rotary(draw, dtype: str) -> Call:
    b, h = d.dim(draw, 1, 2, label="B"), d.dim(draw, 1, 3, label="h")
    t = draw(st.sampled_from([1, 2, 3, 5, 7]), label="T")
    e = d.dim(draw, 2, 8, label="E")
    dims = ([None] if e % 2 == 0 else []) + list(range(2, e + 1, 2))
    rdim = draw(st.sampled_from(dims), label="rotary_dim")
    x = _values(draw, dtype, (b, h, t, e), label="x")
    per_batch = draw(st.booleans(), label="[B,T] positions")
    pos = _positions(draw, (b, t) if per_batch else (t,), "positions")
    base = draw(st.sampled_from([10000.0, 10000.0, 500000.0, 10.0]), label="base")
    inter = draw(st.booleans(), label="interleaved")
    return Call((x, pos), {"base": base, "interleaved": inter, "rotary_dim": rdim})


def _rotary_scale(call: Call, cot=None) -> float:
    """The angle ``p·θ`` is rounded relative to its size: ``max|x|·max(1, max|p|)``."""
    x, pos = call.args
    turn = max(1.0, float(np.max(np.abs(pos), initial=0)))
    return (float(np.max(_abs(x), initial=1.0)) if cot is None else _cot(cot)) * turn


cases("rotary_embedding", k=lambda c: 2, scale=_rotary_scale)(_rotary)


def _pairs(x: np.ndarray, r: int, interleaved: bool) -> tuple[np.ndarray, np.ndarray]:
    if interleaved:
        return x[..., 0:r:2], x[..., 1:r:2]
    return x[..., : r // 2], x[..., r // 2: r]


@prop("rotary_embedding")
def preserves_pair_norms(run, call: Call, dtype: str):
    """Each pair (a, b) is rotated: a'² + b'² = a² + b², and features ≥ rotary_dim pass
    unchanged."""
    x = call.args[0]
    kw = call.kwargs
    r = kw["rotary_dim"] or x.shape[-1]
    y = run("rotary_embedding", *call.args, **kw)
    a, b = _pairs(x.astype(np.float64), r, kw["interleaved"])
    a2, b2 = _pairs(y, r, kw["interleaved"])
    m = float(np.max(_abs(x), initial=1.0))
    yield Close("a'² + b'² = a² + b²", a2 * a2 + b2 * b2, a * a + b * b, k=2,
                scale=2 * m * _rotary_scale(call))
    yield Holds("features ≥ rotary_dim unchanged",
                bool(np.array_equal(y[..., r:], x[..., r:].astype(np.float64))))


@st.composite
def _rotary_shift(draw, dtype: str):
    call = draw(_rotary(dtype))
    return call, draw(st.sampled_from([1, 3, 17, 100]), label="shift")


@prop("rotary_embedding", strategy=_rotary_shift)
def relative_position(run, drawn, dtype: str):
    """⟨R(p)q, R(p')k⟩ depends only on p − p': shifting every position by c leaves the dot
    products of rotated queries and keys (the features of one head, across times)
    unchanged."""
    call, c = drawn
    x, pos = call.args
    kw = call.kwargs
    y0 = run("rotary_embedding", x, pos, **kw)
    y1 = run("rotary_embedding", x, pos + c, **kw)
    dots0, dots1 = y0 @ np.swapaxes(y0, -1, -2), y1 @ np.swapaxes(y1, -1, -2)
    m = float(np.max(_abs(x), initial=1.0))
    big = max(1.0, float(np.max(np.abs(pos + c), initial=0)))
    yield Close("⟨R(p+c)x_t, R(p'+c)x_t'⟩ = ⟨R(p)x_t, R(p')x_t'⟩", dots1, dots0,
                k=x.shape[-1], scale=2 * x.shape[-1] * m * m * big)


# -- gated_mlp ---------------------------------------------------------------------------


@st.composite
def _gated(draw, dtype: str) -> Call:
    ndim = d.dim(draw, 1, 3, label="ndim")
    lead = [d.dim(draw, 1, 3, label=f"dim{i}") for i in range(ndim - 1)]
    dm, f = d.length(draw, 1, 5, label="D"), d.length(draw, 1, 6, label="F")
    regime = draw(st.sampled_from(["normal", "saturating"]), label="x regime")
    x = d.floats(draw, dtype, (*lead, dm), *((-3, 3) if regime == "normal" else (-30, 30)),
                 label="x")
    w = 1.5 / math.sqrt(dm)
    W_gate = d.floats(draw, dtype, (f, dm), -w, w, label="W_gate")
    W_up = d.floats(draw, dtype, (f, dm), -w, w, label="W_up")
    W_down = d.floats(draw, dtype, (dm, f), -1, 1, label="W_down")
    act = draw(st.sampled_from(["silu", "gelu", "gelu_tanh"]), label="activation")
    return Call((x, W_gate, W_up, W_down), {"activation": act})


def _gated_scale(call: Call, cot=None) -> float:
    x, W_gate, W_up, W_down = call.args
    xa = _abs(x)
    a, b = xa @ _abs(W_gate).T, xa @ _abs(W_up).T
    h = np.maximum(a * b, np.maximum(a, b))
    out = float(np.max(h @ _abs(W_down).T, initial=1.0))
    if cot is None:
        return out
    return max(out, float(np.max(h, initial=1.0))) * _grad_factor(cot, x, W_gate, W_up, W_down)


cases("gated_mlp", k=lambda c: c.args[0].shape[-1] + c.args[1].shape[0],
      scale=_gated_scale)(_gated)


@prop("gated_mlp")
def rows_are_independent(run, call: Call, dtype: str):
    """The block acts on each row of x alone: the output of a row does not depend on the
    others (reversing the rows reverses the outputs)."""
    x, *ws = call.args
    flat = x.reshape(-1, x.shape[-1])
    got = run("gated_mlp", flat[::-1].copy(), *ws, **call.kwargs)
    want = run("gated_mlp", flat, *ws, **call.kwargs)[::-1]
    yield Close("gated_mlp(reversed rows) = reversed gated_mlp(rows)", got, want,
                k=x.shape[-1] + ws[0].shape[0], scale=_gated_scale(call))


@prop("gated_mlp")
def zero_gate_or_up_gives_zero(run, call: Call, dtype: str):
    """act(0) = 0 for SiLU and both GELUs: a zero W_gate (or W_up) zeroes the output."""
    x, W_gate, W_up, W_down = call.args
    zero = np.zeros_like(W_gate)
    for which, args in (("W_gate", (x, zero, W_up, W_down)), ("W_up", (x, W_gate, zero, W_down))):
        y = run("gated_mlp", *args, **call.kwargs)
        yield Holds(f"{which} = 0 gives 0", bool(np.all(y == 0)), f"got {y.ravel()[:6]}")


# -- grouped_query_attention ---------------------------------------------------------------

WINDOWS = ("none", "(0, 0)", "(1, 0)", "(0, 1)", "(2, None)", "(None, 1)", "mistral",
           "wider than S")


def _window(draw, n_k: int):
    kind = draw(st.sampled_from(WINDOWS), label="window kind")
    if kind == "mistral":
        return (d.dim(draw, 1, 4, label="w") - 1, 0)
    return {"none": None, "(0, 0)": (0, 0), "(1, 0)": (1, 0), "(0, 1)": (0, 1),
            "(2, None)": (2, None), "(None, 1)": (None, 1),
            "wider than S": (n_k + 3, n_k + 3)}[kind]


def alibi_slopes(draw, dtype: str, b: int, h: int):
    """ALiBi slopes for ``h`` heads (or ``[B, h]``), or none: Press et al.'s geometric
    sequence or drawn ones (shared by the GQA and paged-attention strategies)."""
    kind = draw(st.sampled_from(["none", "none", "geometric [h]", "drawn [h]", "drawn [B,h]"]),
                label="alibi kind")
    if kind == "none":
        return None
    if kind == "geometric [h]":  # Press et al.: 2^(-8i/h), i = 1..h
        return d.as_dtype(2.0 ** (-8.0 * np.arange(1, h + 1) / h), dtype)
    return d.floats(draw, dtype, (h,) if kind == "drawn [h]" else (b, h), 0, 2, label="slopes")


@st.composite
def _gqa_shape(draw):
    ratio = draw(st.sampled_from(["1", "2", "4", "MQA"]), label="h/g")
    if ratio == "MQA":
        g, h = 1, d.dim(draw, 2, 4, label="h")
    else:
        g = d.dim(draw, 1, 2, label="g")
        h = g * int(ratio)
    return d.dim(draw, 1, 2, label="B"), h, g


@st.composite
def _gqa(draw, dtype: str, *, plain: bool = False, causal: bool | None = None) -> Call:
    """``plain``: no offset, window, ALiBi or softcap (what SDPA expresses)."""
    b, h, g = draw(_gqa_shape())
    decode = not plain and draw(st.booleans(), label="decode")
    family = score_family(draw)
    n_k = key_count(draw, family, 6)
    n_q = 1 if decode else d.dim(draw, 1, 4, label="L")
    e = draw(st.sampled_from([1, 2, 3, 5]), label="E")
    ev = d.dim(draw, 1, 3, label="Ev")
    scale = draw(st.sampled_from([None, None, 0.125, 1.0, -0.5, 0.0]), label="scale")
    q, k = shape_scores(draw, dtype, family,
                        _values(draw, dtype, (b, h, n_q, e), label="q", extreme=True),
                        _values(draw, dtype, (b, g, n_k, e), label="k"), scale)
    v = _values(draw, dtype, (b, g, n_k, ev), label="v")
    kw: dict = {"is_causal": bool(causal), "scale": scale}
    if family == "peaked":  # every key visible (to the last query, when causal)
        kw.update({} if plain else {"q_offset": n_k - n_q, "window": None,
                                    "alibi_slopes": None, "softcap": None})
        return Call((q, k, v, None), kw)
    kind = draw(st.sampled_from(["none", "none", "[S]", "[L,S]", "[B,1,1,S]", "[B,h,L,S]"]),
                label="mask shape")
    shape = {"none": None, "[S]": (n_k,), "[L,S]": (n_q, n_k), "[B,1,1,S]": (b, 1, 1, n_k),
             "[B,h,L,S]": (b, h, n_q, n_k)}[kind]
    mask = None if shape is None else _mask(draw, shape, label="mask")
    kw["is_causal"] = draw(st.booleans(), label="is_causal") if causal is None else causal
    if not plain:
        offset = draw(st.sampled_from(["0", "S - L", "S - L", "negative", "beyond S",
                                       "drawn"]), label="q_offset kind")
        kw["q_offset"] = {"0": 0, "S - L": n_k - n_q, "negative": -2, "beyond S": n_k + 1,
                          "drawn": draw(st.integers(-3, n_k + 2), label="q_offset")}[offset]
        kw["window"] = _window(draw, n_k)
        kw["alibi_slopes"] = alibi_slopes(draw, dtype, b, h)
        kw["softcap"] = draw(st.sampled_from([None, None, 1.0, 5.0, 30.0]), label="softcap")
    return Call((q, k, v, mask), kw)


def _gqa_scale(call: Call, cot=None) -> float:
    q, k, v = (a.astype(np.float64) for a in call.args[:3])
    kw = call.kwargs
    s = kw.get("scale")
    s = 1 / math.sqrt(q.shape[-1]) if s is None else abs(s)
    rep = q.shape[1] // k.shape[1]
    ke = np.repeat(np.abs(k), rep, axis=1)
    e = s * float(np.max(np.abs(q) @ np.swapaxes(ke, -1, -2), initial=0.0))
    if kw.get("softcap") is not None:
        e = min(e, kw["softcap"])
    slopes = kw.get("alibi_slopes")
    if slopes is not None:
        n_q, n_k, off = q.shape[2], k.shape[2], kw.get("q_offset", 0)
        dist = max(abs(off + n_q - 1), abs(off - n_k + 1))  # max |q_offset + i − j|
        e += float(np.max(_abs(slopes), initial=0.0)) * dist
    return float(np.max(np.abs(v), initial=1.0)) * max(1.0, e) * _grad_factor(cot, s * q, s * k)


def _gqa_k(call: Call) -> int:
    return call.args[0].shape[-1] + call.args[1].shape[-2]


@st.composite
def _gqa_large(draw, dtype: str) -> Call:
    """Large tier: ``S`` around 64/128/256-key blocks, kernel head dimensions, ``g`` of 1, 2
    and ``h``; prefill (``L = S``) or decoding (``L = 1``) with ``q_offset = S − L``;
    sliding windows of a block's size and one short of it; causal or not."""
    h = big.size(draw, (4, 2, 1), "h")
    g = {"1": 1, "2": min(2, h), "h": h}[draw(st.sampled_from(["2", "1", "h"]), label="g")]
    b = big.size(draw, (1, 2), "B") if h <= 2 else 1
    n_k = big.size(draw, big.LENGTHS, "S")
    n_q = draw(st.sampled_from([n_k, 1]), label="L (S: prefill, 1: decode)")
    e = big.size(draw, big.HEAD_DIMS, "E")
    q = d.floats(draw, dtype, (b, h, n_q, e), label="q")
    k = d.floats(draw, dtype, (b, g, n_k, e), label="k")
    v = d.floats(draw, dtype, (b, g, n_k, e), label="v")
    window = draw(st.sampled_from([None, (127, 0), (63, 0), (128, 0), (64, 64)]),
                  label="window")
    return Call((q, k, v, None), {
        "is_causal": draw(st.booleans(), label="is_causal"),
        "scale": draw(st.sampled_from([None, 0.125]), label="scale"),
        "q_offset": n_k - n_q, "window": window, "alibi_slopes": None,
        "softcap": draw(st.sampled_from([None, 30.0]), label="softcap")})


cases("grouped_query_attention", k=_gqa_k, scale=_gqa_scale, large=_gqa_large)(_gqa)


@prop("grouped_query_attention", strategy=lambda dt: _gqa(dt))
def repeated_kv_heads_change_nothing(run, call: Call, dtype: str):
    """Repeating each key/value head h/g times (so that g = h) leaves the output unchanged:
    query head j reads key/value head j // (h/g)."""
    q, k, v, mask = call.args
    rep = q.shape[1] // k.shape[1]
    got = run("grouped_query_attention", q, np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1),
              mask, **call.kwargs)
    yield Close("GQA(q, repeat(k), repeat(v)) = GQA(q, k, v)", got,
                run("grouped_query_attention", *call.args, **call.kwargs), k=_gqa_k(call),
                scale=_gqa_scale(call))


@prop("grouped_query_attention", strategy=lambda dt: _gqa(dt, plain=True))
def equals_sdpa_when_g_is_h(run, call: Call, dtype: str):
    """Without offset, window, ALiBi or softcap, GQA with the key/value heads repeated to
    g = h is scaled_dot_product_attention (top-left causal)."""
    q, k, v, mask = call.args
    rep = q.shape[1] // k.shape[1]
    kr, vr = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    yield Close("GQA = SDPA(q, repeat(k), repeat(v))",
                run("grouped_query_attention", *call.args, **call.kwargs),
                run("scaled_dot_product_attention", q, kr, vr, mask, **call.kwargs),
                k=_gqa_k(call), scale=_gqa_scale(call))


@prop("grouped_query_attention")
def window_wider_than_sequence_is_no_window(run, call: Call, dtype: str):
    """A window (S + |q_offset| + L, same) reaches every key: it equals no window."""
    q, k = call.args[:2]
    wide = k.shape[2] + abs(call.kwargs.get("q_offset", 0)) + q.shape[2]
    base = {**call.kwargs, "window": None}
    yield Close("GQA(window wider than S) = GQA(no window)",
                run("grouped_query_attention", *call.args, **{**base, "window": (wide, wide)}),
                run("grouped_query_attention", *call.args, **base), k=_gqa_k(call),
                scale=_gqa_scale(Call(call.args, base)))


@st.composite
def _gqa_full_causal(draw, dtype: str):
    """A causal call with L = S queries (key masks, windows, ALiBi, softcap drawn) and a
    number n of last queries to decode."""
    call = draw(_gqa(dtype, causal=True))
    q, k, v, mask = call.args
    b, h, _, e = q.shape
    n_k = k.shape[2]
    qf = _values(draw, dtype, (b, h, n_k, e), label="q (S rows)", extreme=True)
    if mask is not None and mask.ndim >= 2 and mask.shape[-2] != 1:
        mask = _mask(draw, (*mask.shape[:-2], n_k, n_k), label="mask (S rows)")
    kw = {**call.kwargs, "q_offset": 0}
    return Call((qf, k, v, mask), kw), d.dim(draw, 1, n_k, label="n decoded")


@prop("grouped_query_attention", strategy=_gqa_full_causal)
def decode_equals_last_rows(run, drawn, dtype: str):
    """Decoding the last n queries with q_offset = S − n gives the last n rows of full
    causal attention of S queries over the S keys (mask, window, ALiBi and softcap
    included)."""
    call, n = drawn
    q, k, v, mask = call.args
    cut = k.shape[2] - n
    dm = mask
    if mask is not None and mask.ndim >= 2 and mask.shape[-2] != 1:
        dm = mask[..., cut:, :]
    full = run("grouped_query_attention", *call.args, **call.kwargs)
    part = run("grouped_query_attention", q[:, :, cut:], k, v, dm,
               **{**call.kwargs, "q_offset": cut})
    yield Close("decode(q_offset = S − n) = last n rows of full causal", part,
                full[:, :, cut:], k=_gqa_k(call), scale=_gqa_scale(call))


# -- fused_linear_cross_entropy -------------------------------------------------------------


@st.composite
def _flce(draw, dtype: str) -> Call:
    n, dm = d.dim(draw, 1, 5, label="N"), d.length(draw, 1, 4, label="D")
    vocab = d.length(draw, 1, 8, label="V")
    softcap = draw(st.sampled_from([None, None, 1.0, 30.0]), label="softcap")
    regimes = ["normal", "large"] + (["past the dtype's range"] if softcap else [])
    regime = draw(st.sampled_from(regimes), label="logit regime")
    mag = {"normal": (3.0, 1.0), "large": (30.0, 30.0),
           "past the dtype's range": (300.0, 300.0)}[regime]
    hidden = d.floats(draw, dtype, (n, dm), -mag[0], mag[0], label="hidden")
    weight = d.floats(draw, dtype, (vocab, dm), -mag[1], mag[1], label="weight")
    bias_kind = draw(st.sampled_from(["none", "drawn", "common offset"]), label="bias")
    bias = None
    if bias_kind != "none":  # a common offset c shifts every logit (softmax unchanged)
        c = 0.0 if bias_kind == "drawn" else draw(st.sampled_from(d.OFFSETS), label="offset")
        c = min(c, d.FINITE_MAX[dtype] / 8) * draw(st.sampled_from([1.0, -1.0]), label="sign")
        bias = d.floats(draw, dtype, (vocab,), c - 1, c + 1, label="bias")
    ignore = draw(st.sampled_from([-100, 0]), label="ignore_index")
    t = d.ints(draw, (n,), vocab, label="targets")
    drop = draw(st.sampled_from(["none", "some", "all"]), label="ignored rows")
    if drop != "none":
        gone = np.ones(n, bool) if drop == "all" else d.bools(draw, (n,), label="ignored")
        t = np.where(gone, ignore, t).astype(np.int64)
    return Call((hidden, weight, t, bias), {
        "ignore_index": ignore,
        "label_smoothing": draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]), label="label_smoothing"),
        "z_loss": draw(st.sampled_from([0.0, 0.0, 1e-4, 0.1, 1.0]), label="z_loss"),
        "softcap": softcap})


def _logit_bound(call: Call) -> tuple[float, float]:
    """``(Z, lse)``: a bound on the (capped) logits' rounding scale and on ``|lse|``."""
    hidden, weight, _, bias = call.args
    z = _abs(hidden) @ _abs(weight).T + (0.0 if bias is None else _abs(bias))
    bound = float(np.max(z, initial=0.0))
    if call.kwargs["softcap"] is not None:
        bound = min(bound, call.kwargs["softcap"])
    return max(1.0, bound), bound + math.log(weight.shape[0])


def _flce_scale(call: Call, cot=None) -> float:
    z, lse = _logit_bound(call)
    m = z * (1 + 2 * call.kwargs["z_loss"] * lse)
    return m if cot is None else m * _grad_factor(cot, call.args[0], call.args[1])


def _flce_k(call: Call) -> int:
    return call.args[0].shape[1] + call.args[1].shape[0] + call.args[0].shape[0]


@st.composite
def _flce_large(draw, dtype: str) -> Call:
    """Large tier: vocabularies of 32000 (a multiple of every chunk), 32001 and 50257 (a
    partial last chunk), ``N`` of 1…129 rows, hidden widths 64 and 128, some rows
    ignored; logits of a few units (weights ``~ 1/√D``).

    Each example costs the reference about a dozen ``N×D×V`` GEMMs (the value, the vjp,
    the measured conditioning, the baseline), so ``D = 64`` past 7 rows; and since NumPy
    has no half-precision GEMM (the float16 baseline runs at ~20 M multiply-adds/s),
    float16 and bfloat16 draw at most 7 rows (row blocks are covered in float32/float64,
    and in every dtype by ``cross_entropy``, whose reference has no GEMM).
    """
    vocab = big.size(draw, big.VOCABS, "V")
    half = dtype in ("float16", "bfloat16")
    n = big.size(draw, (7, 1) if half else big.ROWS, "N")
    dm = big.size(draw, (64, 128) if n <= 7 else (64,), "D")
    hidden = d.floats(draw, dtype, (n, dm), -3, 3, label="hidden")
    w = 2 / math.sqrt(dm)
    weight = d.floats(draw, dtype, (vocab, dm), -w, w, label="weight")
    bias = d.floats(draw, dtype, (vocab,), -1, 1, label="bias") if draw(
        st.booleans(), label="bias given") else None
    t = big.ids(draw, (n,), vocab, "targets")
    if n > 1:
        t = np.where(big.bools(draw, (n,), 0.1, "ignored rows"), -100, t).astype(np.int64)
    return Call((hidden, weight, t, bias), {
        "ignore_index": -100,
        "label_smoothing": draw(st.sampled_from([0.0, 0.1]), label="label_smoothing"),
        "z_loss": draw(st.sampled_from([0.0, 1e-4]), label="z_loss"),
        "softcap": draw(st.sampled_from([None, 30.0]), label="softcap")})


cases("fused_linear_cross_entropy", k=_flce_k, scale=_flce_scale, large=_flce_large)(_flce)


def _logits(call: Call) -> np.ndarray:
    hidden, weight, _, bias = (None if a is None else np.asarray(a, dtype=np.float64)
                               for a in call.args)
    z = hidden @ weight.T + (0.0 if bias is None else bias)
    cap = call.kwargs["softcap"]
    return z if cap is None else cap * np.tanh(z / cap)


@prop("fused_linear_cross_entropy")
def equals_cross_entropy_of_logits(run, call: Call, dtype: str):
    """Without z-loss, the fused loss is cross_entropy(hidden Wᵀ + b) (capped), with the
    same ignore_index and label smoothing."""
    if call.kwargs["z_loss"] or not np.all(np.isfinite(d.as_dtype(_logits(call), dtype))):
        return
    kw = call.kwargs
    z = d.as_dtype(_logits(call), dtype)
    want = run("cross_entropy", z, call.args[2], ignore_index=kw["ignore_index"],
               label_smoothing=kw["label_smoothing"])
    yield Close("fused CE = cross_entropy(hidden Wᵀ + b)",
                run("fused_linear_cross_entropy", *call.args, **kw), want, k=_flce_k(call),
                scale=_flce_scale(call))


@st.composite
def _flce_split(draw, dtype: str):
    call = draw(_flce(dtype))
    return call, draw(st.integers(0, call.args[0].shape[0]), label="split row")


@prop("fused_linear_cross_entropy", strategy=_flce_split)
def chunked_rows(run, drawn, dtype: str):
    """Splitting the rows into two chunks and weighting each chunk's loss by its count of
    kept rows gives the whole loss (how chunked implementations combine)."""
    call, c = drawn
    hidden, weight, t, bias = call.args
    keep = t != call.kwargs["ignore_index"]
    whole = run("fused_linear_cross_entropy", *call.args, **call.kwargs)
    if not keep.any():
        yield Holds("every row ignored gives NaN", bool(np.isnan(whole)), f"got {whole}")
        return
    total = 0.0
    for rows in (slice(0, c), slice(c, None)):
        n = int(keep[rows].sum())
        if n:
            part = run("fused_linear_cross_entropy", hidden[rows], weight, t[rows], bias,
                       **call.kwargs)
            total += n * float(part)
    yield Close("Σ_chunks n_kept·loss(chunk) / n_kept = loss", total / keep.sum(), whole,
                k=_flce_k(call), scale=_flce_scale(call))
